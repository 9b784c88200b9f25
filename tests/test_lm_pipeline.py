"""The task, labels, SFT loss, and `proximal rlhf` end to end: files, resume, bad input."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_helpers import ARCHITECTURES, completions_for, tiny_model
from proximal.cli import main
from proximal.lm.config import RewardConfig
from proximal.lm.evaluation import evaluate_policy, evaluation_rows
from proximal.labellers import make_labeller
from proximal.lm.labels import label_records, pairs_from_records
from proximal.lm.model import sample_completions
from proximal.lm.sft import encode_demonstrations, sft_loss
from proximal.lm.tasks import AdditionTask, DataSizes
from proximal.labellers import ReplayLabeller
from proximal.losses import bradley_terry_loss

TINY = ["--task.demonstrations", "500", "--task.eval-prompts", "40", "--model.width", "32", "--model.heads", "2",
        "--sft.steps", "30", "--sft.batch-size", "32", "--reward.labels", "120", "--reward.epochs", "1",
        "--ppo.iterations", "4", "--ppo.prompts-per-iteration", "32", "--ppo.minibatch-size", "16",
        "--ppo.eval-every", "2", "--ppo.relabel-every", "2", "--ppo.relabel-pairs", "16", "--ppo.refit-steps", "2",
        "--threads", "1"]


def test_gold_reward_by_hand():
    task = AdditionTask()
    assert task.gold(["47+38=", "47+38=", "47+38=", "0+0="], ["85", "85", "75", "0"],
                     [True, False, True, True]).tolist() == [1.0, 0.0, 0.0, 1.0]  # the second never stopped
    assert task.slices(["47+38=", "41+38=", "5+5=", "99+0="])["carry"].tolist() == [True, False, True, False]


def test_demonstrations_drop_the_carry_at_the_set_rate_and_only_on_carry_prompts():
    task, rng = AdditionTask(carry_noise=0.6), np.random.default_rng(0)
    carry = [task.demonstration("47+38=", rng) for _ in range(4000)]
    assert set(carry) == {"85", "75"}
    assert abs(carry.count("75") / 4000 - 0.6) < 0.03
    assert {task.demonstration("41+38=", rng) for _ in range(200)} == {"79"}


def test_evaluation_prompts_are_held_out_and_splits_repeat_by_seed():
    task = AdditionTask()
    sizes = DataSizes(2000, 300, 300, 500, 0.2)
    data = task.data(3, sizes)
    assert not set(data.evaluation) & set(data.sft_prompts + data.preference_prompts + data.rl)
    assert len(set(data.evaluation)) == 500
    assert task.data(3, sizes) == data


def test_evaluation_rows_are_the_responses_a_loop_draws_and_their_means_are_the_evaluation():
    """Greedy then sampled from one stream seeded `seed`, as a loop over `sample_completions`
    draws them; a reference equal to the policy gives a KL of exactly 0; `evaluate_policy` is
    the rows' means, on a slice too."""
    model, tokenizer = tiny_model()
    prompts = ["12+34=", "5+6=", "77+1=", "9+9="]

    def gold(prompts, texts, ended):
        return np.array([len(text) + 0.5 * bool(end) for text, end in zip(texts, ended)])

    rows = evaluation_rows(model, tokenizer, prompts, gold, 5, 1.0, 3, "cpu", reference=model)
    generator = torch.Generator().manual_seed(3)
    for mode in ("greedy", "sampled"):
        drawn = sample_completions(model, tokenizer, prompts, 5, 1.0, generator, "cpu", greedy=mode == "greedy")
        assert rows[f"gold_{mode}"].tolist() == gold(prompts, drawn.texts(tokenizer), drawn.ended.tolist()).tolist()
    assert rows["response_length"].tolist() == drawn.response_mask.sum(-1).tolist()
    assert rows["eos_rate"].tolist() == drawn.ended.float().tolist()
    assert rows["kl_k1"].tolist() == [0.0] * 4 and rows["kl_k3"].tolist() == [0.0] * 4
    slices = {"first_two": np.array([True, True, False, False])}
    stats = evaluate_policy(model, tokenizer, prompts, gold, slices, 5, 1.0, 3, "cpu", reference=model)
    assert stats == pytest.approx({**{name: float(np.mean(values)) for name, values in rows.items()},
                                   "gold_first_two_greedy": float(np.mean(rows["gold_greedy"][:2])),
                                   "gold_first_two_sampled": float(np.mean(rows["gold_sampled"][:2]))})


def test_sft_loss_counts_response_tokens_only():
    """Against a brute-force loop over each demonstration alone, positions after the prompt."""
    model, tokenizer = tiny_model()
    prompts, responses = ["7+5=", "47+38=", "1+99="], ["12", "75", "100"]
    data = encode_demonstrations(tokenizer, prompts, responses, "cpu")
    with torch.no_grad():
        loss = sft_loss(model, *data)
    total, count = 0.0, 0
    for prompt, response in zip(prompts, responses):
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        targets = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt_ids + targets])).logits[0], -1)
        for t, token in enumerate(targets):
            total -= float(logprobs[len(prompt_ids) - 1 + t, token])
            count += 1
    assert math.isclose(float(loss), total / count, rel_tol=1e-5)


def test_bradley_terry_loss_on_a_hand_computed_pair():
    s1, s2 = torch.tensor([2.0]), torch.tensor([0.5])
    assert math.isclose(float(bradley_terry_loss(s1, s2, torch.tensor([1.0]), 0.0)), math.log(1 + math.exp(-1.5)),
                        rel_tol=1e-6)
    equal = 0.5 * math.log(1 + math.exp(-1.5)) + 0.5 * math.log(1 + math.exp(1.5))
    assert math.isclose(float(bradley_terry_loss(s1, s2, torch.tensor([0.5]), 0.0)), equal, rel_tol=1e-6)


def test_label_records_use_the_prefs_vocabulary_and_replay_exactly():
    task = AdditionTask()
    prompts, first, second = ["47+38=", "1+2=", "5+5="], ["85", "3", "11"], ["75", "3", "10"]
    ended = [True, True, True]
    gold_1, gold_2 = task.gold(prompts, first, ended), task.gold(prompts, second, ended)
    records = label_records(prompts, first, second, ended, ended, gold_1, gold_2,
                            make_labeller(RewardConfig(), np.random.default_rng(0)),
                            0.0, np.random.default_rng(0))
    assert [r["label"] for r in records] == [1.0, 0.5, 0.0]
    assert records[0] == {"query": 0, "prompt": "47+38=", "responses": ["85", "75"], "ended": [True, True],
                          "label": 1.0, "labeller": "synthetic", "true_returns": [1.0, 0.0], "validation": False}
    replay = ReplayLabeller.__new__(ReplayLabeller)
    replay.records, replay.position = json.loads(json.dumps(records)), 0
    assert [replay.answer(*r["true_returns"]) for r in records] == [1.0, 0.5, 0.0]
    _, tokenizer = tiny_model()
    pairs = pairs_from_records(records, tokenizer, "cpu")
    assert pairs.labels.tolist() == [1.0, 0.5, 0.0]
    assert pairs.first.texts(tokenizer) == first and pairs.second.texts(tokenizer) == second


def test_a_pair_of_identical_responses_has_exactly_zero_gradient_and_is_skipped():
    from proximal.lm.labels import teaches_something
    from proximal.lm.model import ScalarHeadLM
    from proximal.lm.reward import reward_loss

    model, tokenizer = tiny_model()
    reward_model = ScalarHeadLM(model)
    torch.nn.init.normal_(reward_model.head.weight)
    record = {"query": 0, "prompt": "47+38=", "responses": ["85", "85"], "ended": [True, True], "label": 0.5,
              "labeller": "synthetic", "true_returns": [1.0, 1.0], "validation": False}
    loss = reward_loss(reward_model, pairs_from_records([record], tokenizer, "cpu"))
    loss.backward()
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in reward_model.parameters())
    assert not teaches_something(record)
    assert teaches_something({**record, "responses": ["85", "75"]})
    assert teaches_something({**record, "ended": [True, False]})
    assert not teaches_something({**record, "responses": ["85", "75"], "label": None})


def test_reward_scores_read_the_eos_token():
    from proximal.lm.model import ScalarHeadLM
    from proximal.lm.reward import reward_scores

    model, tokenizer = tiny_model()
    reward_model = ScalarHeadLM(model)
    torch.nn.init.normal_(reward_model.head.weight)
    batch = completions_for(tokenizer, ["47+38=", "1+2="], ["85", "3"], [True, True])
    with torch.no_grad():
        scores = reward_scores(reward_model, batch)
        for row, (prompt, response) in enumerate([("47+38=", "85"), ("1+2=", "3")]):
            ids = ([tokenizer.bos_token_id] + tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id])
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
            assert math.isclose(float(scores[row]), float(reward_model.head(hidden)), abs_tol=1e-5)


def test_mean_pooled_reward_scores_average_the_head_over_the_response_tokens_only():
    from proximal.lm.model import ScalarHeadLM
    from proximal.lm.reward import reward_scores

    model, tokenizer = tiny_model()
    reward_model = ScalarHeadLM(model, pooling="mean")
    torch.nn.init.normal_(reward_model.head.weight)
    cases = [("47+38=", "85", True), ("1+2=", "3", True), ("9+9=", "18", False)]
    batch = completions_for(tokenizer, *(list(column) for column in zip(*cases)))
    with torch.no_grad():
        scores = reward_scores(reward_model, batch)
        for row, (prompt, response, ended) in enumerate(cases):  # each alone, unpadded
            prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended
            hidden = model(torch.tensor([prompt_ids + response_ids]), output_hidden_states=True).hidden_states[-1][0]
            per_token = [float(reward_model.head(hidden[len(prompt_ids) + t])) for t in range(len(response_ids))]
            assert math.isclose(float(scores[row]), sum(per_token) / len(per_token), abs_tol=1e-5)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_pairs_two_sides_scored_in_one_pass_that_reads_their_prompt_once_score_as_each_alone(pooling, architecture):
    """`pair_scores` (both sides in one batch, `PairBatch.sides`, each prompt read once) against
    `reward_scores` of each side on its own, with sides of different response widths; and the
    Bradley-Terry gradient through the shared prompt against the one of the separate passes."""
    from proximal.lm.model import ScalarHeadLM
    from proximal.lm.reward import pair_scores, reward_scores
    from proximal.losses import bradley_terry_loss

    model, tokenizer = ARCHITECTURES[architecture]()
    reward_model = ScalarHeadLM(model, pooling=pooling)
    torch.nn.init.normal_(reward_model.head.weight)
    records = [{"query": i, "prompt": prompt, "responses": responses, "ended": ended, "label": label,
                "labeller": "synthetic", "true_returns": None, "validation": False}
               for i, (prompt, responses, ended, label) in enumerate([
                   ("47+38=", ["85", "8512"], [True, False], 1.0), ("1+2=", ["3", "4"], [True, True], 0.0),
                   ("9+9=", ["181818", "18"], [False, True], 0.5)])]
    pairs = pairs_from_records(records, tokenizer, "cpu")
    assert pairs.first.response_ids.shape[1] != pairs.second.response_ids.shape[1]
    sides = pairs.sides()
    assert sides.prompt_ids.shape[0] == 6 and torch.equal(sides.prompt_ids[0::2], pairs.first.prompt_ids)

    def loss_and_gradient(scores):
        reward_model.zero_grad()
        first, second = scores()
        loss = bradley_terry_loss(first, second, pairs.labels, 0.0)
        loss.backward()
        return first.detach(), second.detach(), [p.grad for p in reward_model.parameters() if p.grad is not None]

    shared = loss_and_gradient(lambda: pair_scores(reward_model, pairs))
    alone = loss_and_gradient(lambda: (reward_scores(reward_model, pairs.first),
                                       reward_scores(reward_model, pairs.second)))
    assert torch.allclose(shared[0], alone[0], atol=1e-5) and torch.allclose(shared[1], alone[1], atol=1e-5)
    assert len(shared[2]) == len(alone[2]) > 1
    for a, b in zip(shared[2], alone[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_reward_body_of_the_bottom_blocks_is_the_full_models_hidden_state_there_and_saves_as_such(
        architecture, tmp_path):
    """Cut to its bottom block, a model's last hidden state is the full model's hidden state after
    that block, through the final norm; saved and loaded, it is the same one-block model."""
    from proximal.lm.loading import bottom_blocks, load_pretrained, save_pretrained

    full, tokenizer = ARCHITECTURES[architecture](seed=3)
    cut, _ = ARCHITECTURES[architecture](seed=3)
    cut = bottom_blocks(cut, 1)
    ids = torch.tensor([tokenizer("12+34=46", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        after_block = full(ids, output_hidden_states=True).hidden_states[1]
        final_norm = full.base_model.ln_f if architecture == "gpt2" else full.base_model.norm
        expected = final_norm(after_block)
        got = cut(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(got, expected, atol=1e-6)
        save_pretrained(cut, tokenizer, tmp_path / "cut")
        loaded, _ = load_pretrained(tmp_path / "cut")
        assert loaded.config.num_hidden_layers == 1
        assert torch.allclose(loaded(ids, output_hidden_states=True).hidden_states[-1], expected, atol=1e-6)
    assert bottom_blocks(full, 0) is full and full.config.num_hidden_layers == 2


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_the_whole_pipeline_runs_and_each_stage_writes_its_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("proximal.progress.LOG_EVERY_SECONDS", 0.0)  # a line at every step (stderr is no TTY)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY], capsys)
    assert code == 0, err
    progress = [line for line in err.splitlines() if " steps, " in line or " samples, " in line]
    assert progress[0].startswith("sft: 1/30 steps, ")
    assert any(line.startswith("sft: 30/30 steps, ") and ", loss=" in line for line in progress), progress
    assert any(line.startswith("reward: sampling pairs: 480/480 samples, ") for line in progress), progress
    assert any(line.startswith("ppo: 4/4 steps, ") and ", score=" in line for line in progress), progress
    reported = [line for line in out.splitlines() if not line.startswith("reward: warning:")]  # 30 SFT steps: ties
    assert [line.split(":")[0] for line in reported] == ["sft", "reward", "ppo", "run directory"]
    for stage, files in {"sft": ["sft.png", "metrics.csv", "summary.json", "model/config.json"],
                         "reward": ["reward.png", "comparisons.jsonl", "head.pt", "summary.json", "model/config.json"],
                         "ppo": ["ppo.png", "metrics.csv", "summary.json", "samples.md", "comparisons.jsonl",
                                 "model/config.json"]}.items():
        for name in files:
            assert (run_dir / stage / name).is_file(), f"{stage}/{name}"
        assert not (run_dir / stage / "checkpoint.pt").exists()
    comparisons = (run_dir / "reward" / "comparisons.jsonl").read_text().splitlines()
    assert len(comparisons) == 120
    policy_labels = [json.loads(line) for line in (run_dir / "ppo" / "comparisons.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in policy_labels] == [2] * 16 + [4] * 16
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    summary = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert 0.0 <= summary["eval"]["gold_greedy"] <= 1.0
    last = next(csv.DictReader(rows[:1] + rows[-1:]))  # the last iteration's evaluation is the final one
    assert float(last["eval_gold_greedy"]) == summary["eval"]["gold_greedy"]
    # a finished run continues as a no-op; each stage reports that it was skipped
    code, out, _ = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY], capsys)
    assert code == 0 and out.count("skipped") == 3
    code, out, err = run_cli(["generate", str(run_dir / "ppo"), "12+34=", "--greedy"], capsys)
    assert code == 0 and out.startswith("12+34=")


@pytest.mark.slow
def test_a_stage_runs_alone_and_a_killed_ppo_stage_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert run_cli(["rlhf", "--run-dir", str(run_dir), "--stages", "sft", *TINY], capsys)[0] == 0
    assert run_cli(["rlhf", "--run-dir", str(run_dir), "--stages", "reward", *TINY], capsys)[0] == 0
    reference = tmp_path / "reference"
    reference.mkdir()
    for stage in ("sft", "reward"):
        import shutil
        shutil.copytree(run_dir / stage, reference / stage)
    (reference / "config.json").write_text((run_dir / "config.json").read_text())
    assert run_cli(["rlhf", "--run-dir", str(reference), "--stages", "ppo", *TINY], capsys)[0] == 0
    # the "killed" run: the PPO stage stopped after its checkpoint at iteration 2 (eval_every)
    import proximal.lm.ppo as ppo_module
    from proximal.lm.config import RLHFConfig
    from proximal.lm.stage import open_context

    config = RLHFConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    short = open_context(config.with_overrides({"ppo": {"iterations": 3}}), run_dir)

    class Killed(Exception):
        pass

    def kill(*_args, **_kwargs):
        raise Killed

    monkeypatch.setattr(ppo_module, "save_pretrained", kill)  # dies at the end of training, before it is marked done
    with pytest.raises(Killed):
        ppo_module.run_ppo(short)
    monkeypatch.undo()
    assert (run_dir / "ppo" / "checkpoint.pt").exists()
    assert len((run_dir / "ppo" / "metrics.csv").read_text().splitlines()) == 1 + 3
    code, _, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY], capsys)
    assert code == 0, err
    resumed = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    expected = (reference / "ppo" / "metrics.csv").read_text().splitlines()
    strip = lambda lines: [line.rsplit(",", 2)[0] for line in lines]  # noqa: E731  (eval_, wall_seconds differ)
    assert strip(resumed) == strip(expected)
    assert (run_dir / "ppo" / "comparisons.jsonl").read_text() == (reference / "ppo" / "comparisons.jsonl").read_text()


@pytest.mark.slow
def test_a_kl_budget_stops_the_ppo_stage_where_the_unbudgeted_runs_sample_kls_say(tmp_path, capsys):
    free, budgeted = tmp_path / "free", tmp_path / "budgeted"
    flags = [*TINY, "--ppo.relabel-every", "0", "--ppo.eval-every", "6", "--ppo.learning-rate", "3e-3"]
    assert run_cli(["rlhf", "--run-dir", str(free), *flags, "--ppo.iterations", "6"], capsys)[0] == 0
    rows = list(csv.DictReader((free / "ppo" / "metrics.csv").read_text().splitlines()))
    kls = [float(row["kl_k1"]) for row in rows]
    window_means = [sum(kls[i - 2:i + 1]) / 3 for i in range(2, 6)]  # iterations 3..6
    budget = (window_means[0] + max(window_means)) / 2  # far from every mean (metrics.csv rounds to 6 digits)
    stop = 3 + next(i for i, mean in enumerate(window_means) if mean >= budget)
    assert stop < 6 and min(abs(mean - budget) for mean in window_means) > 1e-3, window_means  # a real test
    for stage in ("sft", "reward"):
        import shutil
        shutil.copytree(free / stage, budgeted / stage)
    code, out, err = run_cli(["rlhf", "--run-dir", str(budgeted), *flags, "--ppo.iterations", "6",
                              "--ppo.kl-budget", repr(budget)], capsys)
    assert code == 0, err
    assert f"stopped after {stop} iterations: the KL budget was spent" in out
    stopped = list(csv.DictReader((budgeted / "ppo" / "metrics.csv").read_text().splitlines()))
    same = [column for column in rows[0] if not column.startswith("eval_") and column != "wall_seconds"]
    assert [[row[c] for c in same] for row in stopped] == [[row[c] for c in same] for row in rows[:stop]]
    summary = json.loads((budgeted / "ppo" / "summary.json").read_text())
    assert summary["iterations"] == stop and summary["kl_budget_spent"]
    assert summary["eval"]["gold_greedy"] == float(stopped[-1]["eval_gold_greedy"])  # evaluated where it stopped


@pytest.mark.slow
def test_the_pipeline_starts_from_a_local_hugging_face_directory_of_another_architecture(tmp_path, capsys):
    from lm_helpers import tiny_llama
    from proximal.lm.loading import save_pretrained

    model, tokenizer = tiny_llama()
    save_pretrained(model, tokenizer, tmp_path / "my-llama")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), "--model.path", str(tmp_path / "my-llama"), *TINY],
                             capsys)
    assert code == 0, err
    assert json.loads((run_dir / "ppo" / "model" / "config.json").read_text())["model_type"] == "llama"


def _prepare_bad_input_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "corrupt" / "sft").mkdir(parents=True)
    (tmp_path / "corrupt" / "sft" / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")


BAD_INPUTS = {  # case -> arguments, given the test's directory
    "unknown task": lambda d: ["rlhf", "subtraction"],
    "negative beta": lambda d: ["rlhf", "--ppo.kl-coef", "-0.1"],
    "nan beta": lambda d: ["rlhf", "--ppo.kl-coef", "nan"],
    "not a model": lambda d: ["rlhf", "--model.path", str(d / "not_a_model")],
    "model dir missing": lambda d: ["rlhf", "--model.path", str(d / "nowhere")],
    "prompt longer than the context": lambda d: ["rlhf", "--model.context", "8"],
    "stage without its predecessor": lambda d: ["rlhf", "--stages", "ppo", "--run-dir", str(d / "empty")],
    "reward without sft": lambda d: ["rlhf", "--stages", "reward"],
    "corrupt checkpoint": lambda d: ["rlhf", "--run-dir", str(d / "corrupt"), *TINY],
    "wrong type": lambda d: ["rlhf", "--sft.steps", "many"],
    "unknown device": lambda d: ["rlhf", "--device", "tpu"],
    "generate from nowhere": lambda d: ["generate", str(d / "nowhere"), "1+1="],
    "generate zero temperature": lambda d: ["generate", str(d / "empty"), "1+1=", "--temperature", "0"],
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _prepare_bad_input_files(tmp_path)
    args = BAD_INPUTS[case](tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(args, capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_reward_stage_without_one_strict_answer_is_said_in_one_line_not_carried_as_nan(capsys):
    from proximal.lm.commands import report_stage

    ties = {"labels": 40, "strict_labels": 0, "validation": {"accuracy": math.nan}, "seconds": 1.0}
    report_stage("reward", ties, skipped=False)
    first, warning = capsys.readouterr().out.splitlines()
    assert first == "reward: 40 labelled pairs (0 strict), no strict held-out pair, 1.0 s"
    assert warning.startswith("reward: warning: every answer was a tie or unanswered")
    report_stage("reward", {**ties, "strict_labels": 30, "validation": {"accuracy": 0.75}}, skipped=False)
    assert capsys.readouterr().out == "reward: 40 labelled pairs (30 strict), held-out accuracy 0.750, 1.0 s\n"


@pytest.mark.parametrize("keep_best", [False, True])
def test_the_reward_stage_keeps_the_model_of_its_last_or_of_its_most_accurate_validation(tmp_path, capsys, keep_best):
    """The saved reward model, loaded again and scored on the held-out pairs, agrees with the
    labeller as often as metrics.csv says the fit's last validation did, or with
    --reward.keep-best its most accurate one (the later on a tie), and the summary says which."""
    from proximal.lm.config import RLHFConfig
    from proximal.lm.labels import read_records
    from proximal.lm.loading import load_pretrained
    from proximal.lm.reward import labelled_pairs, load_reward_model, pair_accuracy
    from proximal.lm.stage import open_context

    run_dir = tmp_path / "run"
    flags = [*TINY, "--sft.steps", "100", "--reward.labels", "200", "--reward.labeller-noise", "uniform",
             "--reward.labeller-error-rate", "0.5", "--reward.epochs", "2", "--reward.batch-size", "8",
             "--reward.learning-rate", "3e-3", "--reward.validations", "7",
             "--seed", "1",  # coin flips: a wandering fit, whose last check is not its best on this seed
             "--reward.keep-best" if keep_best else "--no-reward.keep-best"]
    code, out, _ = run_cli(["rlhf", "--run-dir", str(run_dir), "--stages", "sft,reward", *flags], capsys)
    assert code == 0
    with open(run_dir / "reward" / "metrics.csv") as file:
        checks = [(float(row["val_accuracy"]), int(row["step"])) for row in csv.DictReader(file)
                  if row["val_accuracy"]]
    best_accuracy = max(accuracy for accuracy, _ in checks)
    assert checks[-1][0] < best_accuracy  # this fit's last check is not its best, so the two settings differ
    kept = max((check for check in checks if check[0] == best_accuracy), key=lambda check: check[1]) if keep_best \
        else checks[-1]
    ctx = open_context(RLHFConfig.from_dict(json.loads((run_dir / "config.json").read_text())), run_dir)
    _, tokenizer = load_pretrained(run_dir / "sft" / "model")
    _, validation_pairs = labelled_pairs(ctx, read_records(run_dir / "reward" / "comparisons.jsonl"), tokenizer)
    assert pair_accuracy(load_reward_model(ctx), validation_pairs)["accuracy"] == pytest.approx(kept[0], abs=1e-6)
    summary = json.loads((run_dir / "reward" / "summary.json").read_text())
    kept_in_summary = (summary["validation"]["accuracy"], summary["validation"]["step"])
    assert kept_in_summary == pytest.approx(kept, abs=1e-6)  # metrics.csv holds 6 significant digits
    assert summary["validation"]["steps"] == checks[-1][1]  # the last check is at the fit's end
    line = next(line for line in out.splitlines() if line.startswith("reward:"))
    assert f"held-out accuracy {kept[0]:.3f}" in line
    assert (f"(the model of step {kept[1]} of {checks[-1][1]}, its best check)" in line) == keep_best
