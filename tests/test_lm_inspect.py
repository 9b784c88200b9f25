"""`proximal inspect`: the numbers the page shows for each token, read from the DOM in headless
Chromium, against an independent recomputation from the saved models; the page from a file with
no network; a completion's markup shown as text; --serve behind its token; bad input."""

import json
import math
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from proximal.cli import main
from proximal.lm.snapshots import keep_snapshots_until
from test_human import browser, wait_for  # noqa: F401  (the headless Chromium fixture)
from test_lm_pipeline import TINY

LAMBDA = 0.95  # the default --ppo.gae-lambda


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny addition run with a snapshot at iterations 1, 2, 4, and its page."""
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    assert main(["rlhf", "--run-dir", str(run_dir), *TINY, "--ppo.snapshot-every", "2"]) == 0
    assert main(["inspect", str(run_dir)]) == 0
    return run_dir


def token_numbers(driver, row: int, t: int) -> dict[str, str]:
    driver.find_element("css selector", f'#rows .token[data-row="{row}"][data-t="{t}"]').click()
    cells = driver.find_elements("css selector", "#token-table td[data-field]")
    return {cell.get_attribute("data-field"): cell.text for cell in cells}


def close(shown: str, expected: float) -> bool:
    return math.isclose(float(shown), expected, rel_tol=2e-5, abs_tol=2e-6)  # the page shows 6 digits


@torch.no_grad()
def recompute(run_dir: Path, prompt: str, tokens: list[int]) -> tuple[list[float], float]:
    """(log pi_SFT of each response token, the reward model's score at the last one), each row
    alone, with no padding: an independent forward pass of the saved models."""
    from proximal.lm.loading import load_pretrained
    from proximal.lm.model import ScalarHeadLM
    from proximal.checkpoint import load_checkpoint

    sft, tokenizer = load_pretrained(run_dir / "sft" / "model")
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([ids + tokens])
    all_logprobs = torch.log_softmax(sft(sequence).logits[0], -1)
    logprobs = [float(all_logprobs[len(ids) - 1 + t, token]) for t, token in enumerate(tokens)]
    reward_lm, _ = load_pretrained(run_dir / "reward" / "model")
    reward_model = ScalarHeadLM(reward_lm)
    reward_model.head.load_state_dict(load_checkpoint(run_dir / "reward" / "head.pt")["head"])
    hidden = reward_lm(sequence, output_hidden_states=True).hidden_states[-1]  # [1, L, H]
    return logprobs, float(reward_model.head(hidden[0, -1]))


def test_the_page_shows_each_tokens_numbers_as_recomputed_from_the_saved_models(tiny_run, browser):  # noqa: F811
    """Iteration 1: the policy is the SFT model and its value head is zero, so log pi_old =
    log pi_SFT, every KL term and value is exactly 0, the ratio at the update's first step is
    exactly 1, the reward is the score at EOS alone, and GAE (gamma 1) gives lambda^(T-1-t) x score."""
    from proximal.lm.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_run / "sft" / "model")
    snapshot = json.loads((tiny_run / "ppo" / "snapshots.jsonl").read_text().splitlines()[0])
    assert snapshot["iteration"] == 1
    browser.get((tiny_run / "ppo" / "inspect.html").as_uri())
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), what="the page")
    checked = 0
    for row, record in enumerate(snapshot["rows"]):
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + (
            [tokenizer.eos_token_id] if record["ended"] else [])
        logprobs, score = recompute(tiny_run, record["prompt"], ids)
        if not record["ended"]:
            score = -3.0  # the missing-EOS score
        last = len(ids) - 1
        for t in range(len(ids)):
            shown = token_numbers(browser, row, t)
            assert shown["kl_penalty"] == "0" and shown["values"] == "0" and shown["first_ratio"] == "1", shown
            assert close(shown["logprobs"], logprobs[t]) and close(shown["ref_logprobs"], logprobs[t]), (shown, logprobs)
            assert close(shown["rewards"], score if t == last else 0.0), shown
            assert close(shown["advantages"], LAMBDA ** (last - t) * score), shown
            assert close(shown["returns"], LAMBDA ** (last - t) * score), shown
            checked += 1
        assert close(shown["score"], score), shown  # the sequence's score, shown at its last token
        assert f"score {shown['score']}" in browser.find_element("css selector", f'[data-score-row="{row}"]').text
    assert checked >= 8
    summary = {cell.get_attribute("data-summary"): cell.text
               for cell in browser.find_elements("css selector", "#summary td")}
    assert summary["iteration"] == "1" and float(summary["clip fraction"]) >= 0


def test_the_slider_and_the_colour_choice_move_through_the_snapshots(tiny_run, browser):  # noqa: F811
    browser.get((tiny_run / "ppo" / "inspect.html").as_uri())
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), what="the page")
    iterations = [json.loads(line)["iteration"] for line in (tiny_run / "ppo" / "snapshots.jsonl").read_text()
                  .splitlines()]
    assert iterations == [1, 2, 4]
    for index, iteration in enumerate(iterations):
        browser.execute_script(f"const s = document.getElementById('iteration'); s.value = {index}; "
                               "s.dispatchEvent(new Event('input'));")
        assert browser.find_element("id", "iteration-value").text == str(iteration)
    browser.execute_script("const q = document.getElementById('quantity'); q.value = 'advantages'; "
                           "q.dispatchEvent(new Event('change'));")
    legend = float(browser.find_element("id", "legend-max").text)
    last = json.loads((tiny_run / "ppo" / "snapshots.jsonl").read_text().splitlines()[-1])
    assert close(str(legend), max(abs(a) for row in last["rows"] for a in row["advantages"]))
    lines = browser.find_elements("css selector", "#across .across-line")
    assert [int(line.get_attribute("data-iteration")) for line in lines] == iterations  # one prompt, every iteration


def hand_made_snapshot() -> dict:
    """One snapshot of one row whose prompt and tokens are HTML, every field as snapshots.py writes it."""
    row = {"prompt": "<img src=x onerror=\"document.title='hacked'\">", "text": "", "ended": True, "score": 1.5,
           "gold": None, "tokens": ["<script>document.title='hacked'</script>", " \n", "</script><b>x</b>"],
           "clipped": [False, True, False]}
    for name in ("logprobs", "ref_logprobs", "kl_penalty", "rewards", "values", "returns", "advantages", "whitened",
                 "first_ratio", "ratio"):
        row[name] = [0.5, -1.0, 0.25]
    return {"iteration": 1, "kl_coef": 0.3, "clip_coef": 0.2, "method": "ppo", "summary": {}, "rows": [row]}


def test_the_page_needs_no_network_and_shows_markup_as_text(tmp_path, browser):  # noqa: F811
    """A hand-made snapshot whose prompt and tokens are HTML: they render as text; the page loads
    from a file with the browser offline, and references nothing outside itself."""
    snapshot = hand_made_snapshot()
    row = snapshot["rows"][0]
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "snapshots.jsonl").write_text(json.dumps(snapshot) + "\n")
    assert main(["inspect", str(tmp_path)]) == 0
    page = (tmp_path / "ppo" / "inspect.html").read_text()
    assert "://" not in page and "default-src 'none'" in page
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    browser.get((tmp_path / "ppo" / "inspect.html").as_uri())
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), what="the page offline")
    assert browser.title == "proximal inspect"
    assert not browser.find_elements("css selector", "#rows img, #rows b, #rows script")
    tokens = browser.find_elements("css selector", "#rows .token")
    assert tokens[0].text == "<script>document.title='hacked'</script>"
    assert tokens[1].get_attribute("textContent") == "\u00b7\u21b5\n"  # a space and a line break, drawn
    assert "clipped" in tokens[1].get_attribute("class")
    assert browser.find_element("css selector", "#rows .prompt").text == row["prompt"]


def test_a_run_without_snapshots_is_one_line_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "run" / "ppo").mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["inspect", str(tmp_path / "run")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "holds no PPO snapshots" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def _with(snapshot: dict, change) -> dict:
    change(snapshot)
    return snapshot


BAD_SNAPSHOTS = {  # case -> (the file's lines, what the one line must say)
    "nested too deeply": (['{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}", "{}"], "line 1: JSON nested too deeply"),
    "not an object": ([json.dumps([1, 2])], "line 1: a snapshot is a JSON object, got list"),
    "iteration a string": ([json.dumps(_with(hand_made_snapshot(), lambda s: s.update(iteration="1")))],
                           "line 1: field 'iteration' is missing or of the wrong type"),
    "no rows": ([json.dumps(_with(hand_made_snapshot(), lambda s: s.update(rows=[])))], "field 'rows'"),
    "fewer rows than the first": ([json.dumps(hand_made_snapshot()),
                                   json.dumps(_with(hand_made_snapshot(), lambda s: s["rows"].append(s["rows"][0])))],
                                  "line 2: field 'rows'"),
    "tokens not strings": ([json.dumps(_with(hand_made_snapshot(), lambda s: s["rows"][0].update(tokens=[1, 2, 3])))],
                           "row 0: 'tokens' must be a list of strings"),
    "a value short": ([json.dumps(_with(hand_made_snapshot(), lambda s: s["rows"][0]["ratio"].pop()))],
                      "row 0: field 'ratio' is missing or of the wrong type"),
    "a value a string": ([json.dumps(_with(hand_made_snapshot(), lambda s: s["rows"][0].update(score="1.5")))],
                         "row 0: field 'score'"),
    "clipped not booleans": ([json.dumps(_with(hand_made_snapshot(), lambda s: s["rows"][0].update(clipped=[0, 1, 0])))],
                             "row 0: field 'clipped'"),
}


@pytest.mark.parametrize("case", list(BAD_SNAPSHOTS))
def test_a_snapshot_the_page_could_not_draw_is_one_line_and_nothing_is_written(case, tmp_path, capsys):
    """The page took any JSON and failed in the browser (a TypeError); a 100,000-deep line was a
    RecursionError traceback."""
    lines, message = BAD_SNAPSHOTS[case]
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "snapshots.jsonl").write_text("".join(line + "\n" for line in lines))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "snapshots.jsonl " in err and message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_nan_in_the_summary_is_shown_as_a_dash_not_left_to_break_the_pages_json(tmp_path):
    snapshot = _with(hand_made_snapshot(), lambda s: s.update(summary={"explained_variance": math.nan, "score": 0.5}))
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "snapshots.jsonl").write_text(json.dumps(snapshot) + "\n")
    assert main(["inspect", str(tmp_path)]) == 0
    page = (tmp_path / "ppo" / "inspect.html").read_text()
    data = page.split('<script id="data" type="application/json">')[1].split("</script>")[0]
    summary = json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} is no JSON"))["snapshots"][0]["summary"]
    assert summary == {"explained_variance": None, "score": 0.5}


def test_a_resumed_stage_keeps_the_snapshots_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "snapshots.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "rows": []}) + "\n" for i in (1, 10, 20)) + '{"iteration": 3')
    keep_snapshots_until(path, 10)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 10]


def test_serve_needs_the_token_and_stops_on_sigterm(tiny_run):
    process = subprocess.Popen([sys.executable, "-m", "proximal", "inspect", str(tiny_run), "--serve", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:") and "?token=" in url, lines
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"What PPO saw" in response.read()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        for bad in (url.split("?")[0], url[:-3] + "abc"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(bad, timeout=10)
            assert refused.value.code == 403
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 128 + signal.SIGTERM  # as every command stops on SIGTERM
