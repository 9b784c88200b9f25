"""A user's own data and reward: the file formats (standard and conversational, through a chat
template), a reward function reaching PPO, the shipped example end to end, a user's model as the
start, and every bad input as one line naming the file, the line and the field."""

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_helpers import tiny_llama
from proximal.cli import main
from proximal.lm.config import DataConfig
from proximal.lm.data import FileTask, prompt_examples
from proximal.lm.loading import build_char_tokenizer, save_pretrained
from proximal.lm.model import encode_prompts, encode_responses
from proximal.lm.tasks import DataSizes

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "positive_words"
SIZES = DataSizes(0, 0, 0, 0, 0.25)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LETTERS = "abcdefghijklmnopqrstuvwxyz ,.?!\n"


def chat_tokenizer():
    """A character tokenizer with a ChatML-style template whose end of turn is the EOS token."""
    tokenizer = build_char_tokenizer(LETTERS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def by_hand(tokenizer, *pieces) -> list[int]:
    """Token ids built without the tokenizer's parsing: a special token by name, text char by char."""
    vocab = tokenizer.get_vocab()
    ids = []
    for piece in pieces:
        ids += [vocab[piece]] if piece in ("<bos>", "<|im_start|>", "<|im_end|>") else [vocab[c] for c in piece]
    return ids


def write_lines(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def ids_of(tokenizer, prompts, completions):
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")
    response_ids, response_mask = encode_responses(tokenizer, completions, [True] * len(completions), "cpu")
    return ([row[mask].tolist() for row, mask in zip(prompt_ids, prompt_mask)],
            [row[mask].tolist() for row, mask in zip(response_ids, response_mask)], response_mask)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_every_format_gives_the_token_ids_of_a_hand_built_chat_rendering(tmp_path):
    tokenizer = chat_tokenizer()
    chat_prompt = by_hand(tokenizer, "<bos>", "<|im_start|>", "user\nhi there?", "<|im_end|>", "\n", "<|im_start|>",
                          "assistant\n")
    chat_reply = by_hand(tokenizer, "hello.", "<|im_end|>")  # the completion, then EOS = the end of the turn
    task = FileTask(DataConfig(
        prompts=write_lines(tmp_path / "p.jsonl", [{"prompt": [user("hi there?")]}, {"prompt": "hi there?"}]),
        sft=write_lines(tmp_path / "s.jsonl", [{"prompt": [user("hi there?")], "completion": [assistant("hello.")]},
                                               {"messages": [user("hi there?"), assistant("hello.")]},
                                               {"prompt": "hi there?", "completion": "hello."}]),
        preferences=write_lines(tmp_path / "q.jsonl", [
            {"prompt": [user("hi there?")], "chosen": [assistant("hello.")], "rejected": [assistant("go away.")]},
            {"chosen": [user("hi there?"), assistant("hello.")], "rejected": [user("hi there?"), assistant("go away.")]},
            {"prompt": "hi there?", "chosen": "hello.", "rejected": "go away."}]),
        eval_prompts=write_lines(tmp_path / "e.jsonl", [{"prompt": "hi there?"}])))
    data = task.data(0, SIZES, tokenizer)
    plain_prompt, plain_reply = by_hand(tokenizer, "<bos>", "hi there?"), by_hand(tokenizer, "hello.", "<|im_end|>")
    prompts, replies, mask = ids_of(tokenizer, data.sft_prompts, data.sft_completions)
    assert prompts == [chat_prompt, chat_prompt, plain_prompt] and replies == [chat_reply, chat_reply, plain_reply]
    assert mask.sum(-1).tolist() == [len(chat_reply)] * 3  # the loss mask: completion tokens and EOS, nothing else
    assert sorted(ids_of(tokenizer, data.rl, ["x"] * len(data.rl))[0]) == sorted([chat_prompt, plain_prompt])
    for record, expected_prompt in zip(data.preferences, [chat_prompt, chat_prompt, plain_prompt]):
        prompt, pair, _ = ids_of(tokenizer, [record["prompt"]] * 2, record["responses"])
        assert prompt == [expected_prompt] * 2
        assert pair == [chat_reply, by_hand(tokenizer, "go away.", "<|im_end|>")]
        assert record["label"] == 1.0 and record["origin"].startswith(str(tmp_path / "q.jsonl") + " line ")


def test_a_prompt_that_begins_with_bos_gets_no_second_one():
    tokenizer = build_char_tokenizer("ab")
    assert ids_of(tokenizer, ["<bos>ab", "ab"], ["a", "a"])[0] == [by_hand(tokenizer, "<bos>", "ab")] * 2


def test_the_labellers_pairs_are_as_many_as_reward_labels_asks_of_the_training_prompts(tmp_path):
    """--reward.labels 6 on a file of 40 prompts: 6 distinct training prompts, seeded, in their
    order; more labels than prompts: each training prompt once."""
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": f"say {i}"} for i in range(40)])
    task = FileTask(DataConfig(prompts=path, eval_fraction=0.25))
    six = task.data(0, DataSizes(0, 6, 0, 0, 0.25), None)
    assert len(six.preference_prompts) == len(set(six.preference_prompts)) == 6
    assert set(six.preference_prompts) <= set(six.rl)
    assert six.preference_prompts == sorted(six.preference_prompts, key=six.rl.index)
    assert task.data(0, DataSizes(0, 6, 0, 0, 0.25), None).preference_prompts == six.preference_prompts
    assert task.data(0, DataSizes(0, 20_000, 0, 0, 0.25), None).preference_prompts == six.rl


def test_a_utf8_byte_order_mark_is_skipped_as_utf8_sig_does(tmp_path):
    """Windows editors begin a UTF-8 file with EF BB BF; it was refused with a Python-specific hint."""
    lines = '{"prompt": "describe the cat."}\n{"prompt": "caf\u00e9?"}\n'
    (tmp_path / "plain.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode("utf-8"))
    plain, marked = prompt_examples(str(tmp_path / "plain.jsonl")), prompt_examples(str(tmp_path / "bom.jsonl"))
    assert [e.prompt for e in marked] == [e.prompt for e in plain] == ["describe the cat.", "caf\u00e9?"]


def test_held_out_prompts_are_a_seeded_split_disjoint_from_training(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": f"say {i}"} for i in range(40)])
    task = FileTask(DataConfig(prompts=path, eval_fraction=0.25))
    first, again, other = (task.data(seed, SIZES, None) for seed in (0, 0, 1))
    assert len(first.evaluation) == 10 and len(first.rl) == 30 and not set(first.evaluation) & set(first.rl)
    assert first == again and first.evaluation != other.evaluation


def test_a_reward_function_reaches_ppo_exactly_as_the_score_at_eos(tmp_path):
    from lm_helpers import tiny_model
    from proximal.lm.config import PPOStageConfig
    from proximal.lm.model import ScalarHeadLM, encode_completions
    from proximal.lm.rollout import collect_rollout
    from proximal.lm.reward_function import RewardFunction

    (tmp_path / "my_reward.py").write_text("def score(prompts, completions):\n"
                                           "    return [len(c) + 0.25 * len(p) for p, c in zip(prompts, completions)]\n")
    function = RewardFunction(f"{tmp_path / 'my_reward.py'}:score", missing_eos_score=-3.0)
    model, tokenizer = tiny_model(0)
    policy = ScalarHeadLM(tiny_model(1)[0])
    prompts, responses, ended = ["12+34=", "5+5=", "99+1=", "7+7="], ["46", "1", "1000", ""], [True, True, False, True]
    completions = encode_completions(tokenizer, prompts, responses, ended, "cpu")
    config = PPOStageConfig(prompts_per_iteration=4, minibatch_size=2, kl_coef=0.0, missing_eos_score=-3.0)
    rollout = collect_rollout(policy, model, function, prompts, completions, tokenizer,
                              [torch.tensor([0, 3]), torch.tensor([1, 2])], config, kl_coef=0.0)
    expected = torch.zeros_like(rollout.rewards)
    for row, (prompt, response, end) in enumerate(zip(prompts, responses, ended)):
        expected[row, len(response) - (0 if end else 1)] = len(response) + 0.25 * len(prompt) if end else -3.0
    assert torch.equal(rollout.rewards, expected)  # beta = 0: the function's value at EOS and nothing else


def test_the_shipped_example_is_what_its_script_writes(tmp_path):
    import shutil

    shutil.copy(EXAMPLE / "make_data.py", tmp_path / "make_data.py")
    subprocess.run([sys.executable, str(tmp_path / "make_data.py")], check=True)
    for name in ("prompts", "eval_prompts", "sft", "preferences"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (EXAMPLE / f"{name}.jsonl").read_text(), name


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


EXAMPLE_FLAGS = ["--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--data.sft", str(EXAMPLE / "sft.jsonl"),
                 "--data.eval-prompts", str(EXAMPLE / "eval_prompts.jsonl"), "--model.context", "64",
                 "--ppo.max-new-tokens", "20", "--sft.steps", "150",
                 "--sft.batch-size", "64", "--ppo.iterations", "3", "--ppo.prompts-per-iteration", "32",
                 "--ppo.minibatch-size", "16", "--ppo.eval-every", "3", "--threads", "1"]


@pytest.mark.slow
def test_a_preference_file_teaches_a_reward_model_its_rule_and_ppo_runs_on_it(tmp_path, capsys):
    """The example's rule (a positive adjective beats a negative one) cannot be guessed from one
    completion alone: chance is 0.5; the reward model must learn it."""
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *EXAMPLE_FLAGS, "--data.preferences",
                              str(EXAMPLE / "preferences.jsonl"), "--reward.learning-rate", "1e-3"], capsys)
    assert code == 0, err
    reward = json.loads((run_dir / "reward" / "summary.json").read_text())
    assert reward["validation_pairs"] > 40 and reward["validation"]["accuracy"] >= 0.9
    assert math.isnan(reward["validation"]["gold_accuracy"])  # no gold in a user's files
    header = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "gold" not in header and not any(column.startswith("eval_gold") for column in header)
    assert json.loads((run_dir / "config.json").read_text())["task"]["name"] == "files"
    assert "held-out responses" in out


@pytest.mark.slow
def test_a_reward_function_replaces_the_reward_model(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *EXAMPLE_FLAGS, "--reward.function",
                              f"{EXAMPLE / 'reward.py'}:positivity"], capsys)
    assert code == 0, err
    assert not (run_dir / "reward").exists()  # no reward model is fitted
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and "eval_gold_greedy" in rows[0].split(",")  # the function measures too
    assert "held-out gold greedy" in out


def save_example_model(path: Path) -> None:
    """A tiny random Llama whose character tokenizer covers the shipped example's files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    alphabet = FileTask(DataConfig(prompts=str(EXAMPLE / "prompts.jsonl"),
                                   preferences=str(EXAMPLE / "preferences.jsonl"))).alphabet
    tokenizer = build_char_tokenizer(alphabet)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    save_pretrained(model, tokenizer, path)


@pytest.mark.slow
def test_a_users_model_is_the_start_when_sft_is_left_out(tmp_path, capsys):
    """--model.path with --stages reward,ppo: no SFT; the reward model and PPO start from it."""
    save_example_model(tmp_path / "mine")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), "--model.path", str(tmp_path / "mine"),
                              "--stages", "reward,ppo", "--data.prompts", str(EXAMPLE / "prompts.jsonl"),
                              "--data.preferences", str(EXAMPLE / "preferences.jsonl"), "--ppo.max-new-tokens", "8",
                              "--reward.epochs", "1", "--ppo.iterations", "2", "--ppo.prompts-per-iteration", "16",
                              "--ppo.minibatch-size", "8", "--threads", "1"], capsys)
    assert code == 0, err
    assert not (run_dir / "sft").exists() and (run_dir / "ppo" / "summary.json").is_file()
    assert json.loads((run_dir / "ppo" / "model" / "config.json").read_text())["model_type"] == "llama"


# -- bad input: one line naming the file, the line and the field; nothing written ----------------------

def _chat_model(d: Path) -> None:
    model, _ = tiny_llama()
    save_pretrained(model, build_char_tokenizer(LETTERS), d / "no_template")


GOOD = '{"prompt": "describe the cat.", "completion": "the cat is kind."}'
BAD_FILES = {  # case -> (file name, lines, flag, what the one line must say)
    "malformed json": ("sft.jsonl", [GOOD, '{"prompt": "a", '], "--data.sft", "line 2: not valid JSON"),
    "not an object": ("prompts.jsonl", ['["describe the cat."]'], "--data.prompts", "line 1: a record must be"),
    "missing field": ("prompts.jsonl", ['{"promt": "describe the cat."}'], "--data.prompts", "line 1: no 'prompt'"),
    "wrong type": ("sft.jsonl", ['{"prompt": 3, "completion": "the cat is kind."}'], "--data.sft",
                   "line 1: field 'prompt' must be a string"),
    "empty completion": ("sft.jsonl", [GOOD, GOOD, '{"prompt": "describe the cat.", "completion": " "}'],
                         "--data.sft", "line 3: field 'completion' is empty"),
    "chosen equals rejected": ("preferences.jsonl", ['{"prompt": "a", "chosen": "the cat.", "rejected": "the cat."}'],
                               "--data.preferences", "line 1: fields 'chosen' and 'rejected' are the same"),
    "bad message": ("sft.jsonl", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}'],
                    "--data.sft", "line 1: field 'messages', message 1"),
    "implicit prompts differ": ("preferences.jsonl", [json.dumps(
        {"chosen": [user("hi"), assistant("a")], "rejected": [user("ho"), assistant("b")]})], "--data.preferences",
        "line 1: fields 'chosen' and 'rejected' must share"),
    "empty file": ("prompts.jsonl", [""], "--data.prompts", "holds no records"),
    "nested too deeply": ("prompts.jsonl", ['{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"], "--data.prompts",
                          "line 1: JSON nested too deeply to read"),
    "a lone surrogate": ("prompts.jsonl", ['{"prompt": "the cat."}', '{"prompt": "a\\ud800b"}'], "--data.prompts",
                         "line 2: a string holds a lone UTF-16 surrogate (\\ud800), which is not text"),
    "a directory": ("prompts.jsonl", None, "--data.prompts", "prompts.jsonl: is a directory"),
    "not UTF-8": ("prompts.jsonl", b'{"prompt": "caf\xe9"}\n', "--data.prompts", "not UTF-8 text (byte 15"),
    "record longer than the context": ("sft.jsonl", [GOOD, '{"prompt": "describe the cat.", "completion": "' + "a" * 80
                                                     + '"}', GOOD.replace("kind", "a" * 70).replace("cat.", "dog.")], "--data.sft",
                                       "line 2: prompt plus completion plus EOS is 99 tokens, more than the model's "
                                       "context of 64 (2 of 3 such records are refused"),
    "conversational without a chat template": ("prompts.jsonl", [json.dumps({"prompt": [user("hi")]}),
                                                                json.dumps({"prompt": [user("ho")]})],
                                               "--data.prompts", "a conversational record needs a model with "
                                                                 "a chat template"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_record_is_one_line_with_its_file_line_and_field(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, lines, flag, message = BAD_FILES[case]
    if lines is None:
        (tmp_path / name).mkdir()
    elif isinstance(lines, bytes):
        (tmp_path / name).write_bytes(lines)
    else:
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    extra = []
    if case == "conversational without a chat template":
        _chat_model(tmp_path)
        extra = ["--model.path", str(tmp_path / "no_template"), "--stages", "ppo", "--reward.function", "x:y"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(["rlhf", flag, name, "--model.context", "64", *extra], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{name}" in err and message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


FUNCTIONS = {  # case -> (the module's source, what the one line must say)
    "cannot be imported": ("import no_such_module_here\n", "importing"),
    "no such callable": ("def other(p, c):\n    return [0.0] * len(c)\n", "has no callable 'score'"),
    "raises": ("def score(p, c):\n    raise ValueError('no scores today')\n", "raised ValueError: no scores today"),
    "wrong count": ("def score(p, c):\n    return [1.0]\n", "returned 1 values for 2 completions"),
    "nan": ("def score(p, c):\n    return [float('nan')] * len(c)\n", "returned nan for the completion"),
    "not numbers": ("def score(p, c):\n    return ['good'] * len(c)\n", "must return one number per completion"),
    "numbers as strings": ("def score(p, c):\n    return ['1.0'] * len(c)\n", "must return one number per completion"),
    "beyond a float": ("def score(p, c):\n    return [10 ** 400] * len(c)\n", "must return one number per completion"),
    "a 2-D array": ("import numpy\ndef score(p, c):\n    return numpy.zeros((len(c), 3))\n",
                    "must return one number per completion"),
    "sys.exit(0)": ("import sys\ndef score(p, c):\n    sys.exit(0)\n", "raised SystemExit: 0"),
    "SystemExit(3)": ("def score(p, c):\n    raise SystemExit(3)\n", "raised SystemExit: 3"),
    "KeyboardInterrupt": ("def score(p, c):\n    raise KeyboardInterrupt\n", "raised KeyboardInterrupt"),
}


@pytest.mark.parametrize("case", list(FUNCTIONS))
def test_a_bad_reward_function_is_one_line_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, message = FUNCTIONS[case]
    (tmp_path / "my_reward.py").write_text(source)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(["rlhf", "--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--data.sft",
                              str(EXAMPLE / "sft.jsonl"), "--model.context", "64", "--reward.function",
                              "my_reward.py:score"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*") if "__pycache__" not in str(p)) == before


SLOW = """import time
def score(p, c):
    for _ in range(300):
        try:
            time.sleep(0.1)
        except Exception:  # a function that swallows errors is stopped all the same
            pass
    return [0.0] * len(c)
"""


def test_a_reward_function_past_its_timeout_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text(SLOW)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(["rlhf", "--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--data.sft",
                              str(EXAMPLE / "sft.jsonl"), "--model.context", "64", "--reward.function",
                              "my_reward.py:score", "--reward.function-timeout", "0.3"], capsys)
    assert code != 0 and err.strip().splitlines() == [
        "proximal rlhf: error: --reward.function my_reward.py:score took more than 0.3 s on 2 completions "
        "(--reward.function-timeout)"], err
    assert sorted(str(p) for p in tmp_path.rglob("*") if "__pycache__" not in str(p)) == before


def test_a_slow_reward_function_call_is_announced_once_and_runs_on(tmp_path, monkeypatch):
    import threading

    import proximal.lm.reward_function as reward_function

    announced, lines = threading.Event(), []
    monkeypatch.setattr(reward_function, "SLOW_CALL_SECONDS", 0.05)
    monkeypatch.setattr(reward_function, "print", lambda line, **_: (lines.append(line), announced.set()),
                        raising=False)
    (tmp_path / "waits.py").write_text("def score(p, c):\n    assert EVENT.wait(20)\n    return [1.0] * len(c)\n")
    function = reward_function.RewardFunction(f"{tmp_path / 'waits.py'}:score", None)
    function.function.__globals__["EVENT"] = announced  # it returns once the announcement is made
    assert function(["a", "b", "c"], ["x", "y", "z"]).tolist() == [1.0, 1.0, 1.0]
    assert lines == [f"--reward.function {tmp_path / 'waits.py'}:score: one call on 3 completions has run 0.05 s "
                     "so far (--reward.function-timeout S stops such a call)"]


BAD_RUNS = {  # case -> (arguments after the example's files, what the one line must say)
    "a task beside files": (["addition"], "task must be left out when --data.* files are given"),
    "sft without demonstrations": (["--stages", "sft"], "the sft stage needs demonstrations"),
    "no model to start from": (["--stages", "reward,ppo"], "needs a model to start from"),
    "reward without pairs or a labeller": (["--data.sft", str(EXAMPLE / "sft.jsonl"), "--stages", "sft,reward"],
                                           "the reward stage needs labelled pairs"),
    "a role that is none": (["--reward.function-role", "judge"], "--reward.function-role must be reward or labeller"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_run_that_cannot_work_is_one_line_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, message = BAD_RUNS[case]
    code, out, err = run_cli(["rlhf", *args, "--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--model.context",
                              "64"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


TINY_RUNS = {  # case -> (the files' records by flag, what the one line must say)
    "one prompt": ({"--data.prompts": [{"prompt": "Say hi."}], "--data.sft": [{"prompt": "Hi?", "completion": " hi"}]},
                   "prompts.jsonl: 1 distinct prompt(s), too few to hold 1 out for evaluation"),
    "one demonstration and no prompts": ({"--data.sft": [{"prompt": "Hi?", "completion": " hi"}]},
                                         "sft.jsonl: 1 distinct prompt(s), too few to hold 1 out"),
    "one training prompt for a learned reward": (
        {"--data.prompts": [{"prompt": "Say hi."}], "--data.eval-prompts": [{"prompt": "Say bye."}],
         "--data.sft": [{"prompt": "Hi?", "completion": " hi"}],
         "--data.preferences": [{"prompt": "Say hi.", "chosen": " hi", "rejected": " no"}]},
        "needs at least 2 of them, got 1"),
}


@pytest.mark.parametrize("case", list(TINY_RUNS))
def test_too_few_records_for_the_splits_is_one_line_before_anything_is_written(case, tmp_path, capsys,
                                                                              monkeypatch):
    """One record trained SFT and then raised a traceback (an empty held-out split), or ended in
    'the PPO loss became NaN' (the std of one reward score): now one line up front."""
    files, message = TINY_RUNS[case]
    data = tmp_path / "data"
    data.mkdir()
    args = [a for flag, records in files.items()
            for a in (flag, write_lines(data / f"{flag.removeprefix('--data.')}.jsonl", records))]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["rlhf", *args, "--model.context", "64", "--threads", "1"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_failed_start_writes_nothing_and_a_corrected_flag_or_another_port_is_accepted(tmp_path, capsys):
    """Damaged weights and a busy port were found after config.json and sft/ were written, and the
    corrected rerun was then refused ('was run with another config'), as was a resumed run on
    another --reward.port."""
    save_example_model(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    run_dir = tmp_path / "run"
    flags = ["--run-dir", str(run_dir), "--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--ppo.max-new-tokens", "4",
             "--ppo.iterations", "1", "--ppo.prompts-per-iteration", "8", "--ppo.minibatch-size", "8",
             "--ppo.eval-every", "1", "--threads", "1"]
    by_function = ["--stages", "ppo", "--reward.function", f"{EXAMPLE / 'reward.py'}:positivity"]
    code, _, err = run_cli(["rlhf", *flags, *by_function, "--model.path", str(tmp_path / "cut")], capsys)
    assert code != 0 and "cut holds no loadable causal LM" in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(["rlhf", *flags, "--stages", "reward,ppo", "--reward.labeller", "human",
                                "--ppo.relabel-every", "0", "--reward.port", str(port), "--model.path",
                                str(tmp_path / "good")], capsys)
    assert code != 0 and f"cannot serve the labelling page on 127.0.0.1:{port}" in err, err
    assert not run_dir.exists()
    run_dir.mkdir()  # a directory an older failed start left: its config, no stage begun
    (run_dir / "config.json").write_text(json.dumps({"ppo": {"iterations": 7}}))
    (run_dir / "ppo").mkdir()
    code, _, err = run_cli(["rlhf", *flags, *by_function, "--model.path", str(tmp_path / "good")], capsys)
    assert code == 0, err
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["ppo"]["iterations"] == 1 and (run_dir / "ppo" / "summary.json").is_file()
    code, _, err = run_cli(["rlhf", *flags, *by_function, "--model.path", str(tmp_path / "good"),
                            "--reward.port", "9999"], capsys)  # only where the page is served changed
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["reward"]["port"] == 9999
    code, _, err = run_cli(["rlhf", *flags, *by_function, "--model.path", str(tmp_path / "good"),
                            "--ppo.max-new-tokens", "5"], capsys)  # a stage has begun: refused as before
    assert code != 0 and "was run with another config" in err, err


GOOD_RECORD = {"query": 0, "prompt": "1+1=", "responses": ["2", "3"], "ended": [True, True], "label": 1.0,
               "labeller": "synthetic", "true_returns": [1.0, 0.0], "validation": False}


@pytest.mark.parametrize("line, message", [
    ('{"label": NaN, "prompt": "1+1=", "responses": ["2", "3"], "ended": [true, true], "validation": false}',
     "'label' must be 1.0, 0.0, 0.5, null or a number in [0, 1], got NaN"),
    (json.dumps({**GOOD_RECORD, "label": 2.0}), "got 2.0"),
    (json.dumps({**GOOD_RECORD, "label": -1.0}), "got -1.0"),
    (json.dumps({**GOOD_RECORD, "label": "first"}), 'got "first"'),
    (json.dumps({**GOOD_RECORD, "label": True}), "got true"),
    ("[1, 2]", "a JSON object is expected, got list"),
    (json.dumps({k: v for k, v in GOOD_RECORD.items() if k != "responses"}), "the field 'responses' is missing"),
    (json.dumps({**GOOD_RECORD, "responses": ["2"]}), "'responses' must be a list of two strs"),
    (json.dumps({**GOOD_RECORD, "ended": [1, 0]}), "'ended' must be a list of two bools"),
    (json.dumps({**GOOD_RECORD, "true_returns": ["a", "b"]}), "'true_returns' must be null or a list of two numbers"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_comparisons_line_is_one_line_naming_file_line_and_field(tmp_path, line, message):
    from proximal.errors import CheckpointError
    from proximal.lm.labels import read_records

    path = tmp_path / "comparisons.jsonl"
    path.write_text(json.dumps(GOOD_RECORD) + "\n" + line + "\n")
    with pytest.raises(CheckpointError) as raised:
        read_records(path)
    assert str(raised.value).startswith(f"{path} line 2: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_good_comparisons_lines_read_back_as_written(tmp_path):
    from proximal.lm.labels import read_records, write_records

    records = [GOOD_RECORD, {**GOOD_RECORD, "query": 1, "label": None, "true_returns": None},
               {**GOOD_RECORD, "query": 2, "label": 0.5}, {**GOOD_RECORD, "query": 3, "label": 0.25}]
    write_records(tmp_path / "c.jsonl", records)
    assert read_records(tmp_path / "c.jsonl") == records
    (tmp_path / "empty.jsonl").write_text("")
    assert read_records(tmp_path / "empty.jsonl") == []


def test_a_fit_that_turned_nan_is_refused_in_one_line():
    from proximal.errors import ProximalError
    from proximal.lm.model import ScalarHeadLM
    from proximal.lm.reward import require_finite

    model = ScalarHeadLM(tiny_llama(0)[0])
    require_finite(model, "the reward model")  # a fresh model passes
    with torch.no_grad():
        model.head.weight[0, 3] = float("nan")
    with pytest.raises(ProximalError, match="^the reward model's weights turned NaN or infinite during the fit"):
        require_finite(model, "the reward model")


@pytest.mark.parametrize("extra, message", [
    (["hello"], "the tokenizer cannot encode 'hello'"),
    (["1+1=", "--max-new-tokens", "100"], "with --max-new-tokens 100 that is more than the model's context of 16"),
    (["1+1=" * 5], "is 21 tokens: with --max-new-tokens"),
    (["1+1=", "--temperature", "1e-45"], "--temperature must be a finite number >= 0.01"),
])
def test_generate_refuses_what_the_model_cannot_take_in_one_line(tmp_path, capsys, extra, message):
    from lm_helpers import tiny_model
    from proximal.lm.loading import save_pretrained

    model, tokenizer = tiny_model(0)
    save_pretrained(model, tokenizer, tmp_path / "model")
    try:
        code = main(["generate", str(tmp_path / "model"), *extra])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_generate_defaults_to_the_runs_length_or_what_the_context_leaves(tmp_path):
    from argparse import Namespace

    from proximal.lm.commands import GENERATE_NEW_TOKENS, _generate_length

    given, unset = Namespace(max_new_tokens=7), Namespace(max_new_tokens=None)
    stage = tmp_path / "run" / "ppo"
    stage.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"ppo": {"max_new_tokens": 32}}))
    assert _generate_length(given, stage, [4], 16) == 7  # the flag wins
    assert _generate_length(unset, stage, [4], 2048) == 32  # a stage folder: the length its run trained with
    assert _generate_length(unset, tmp_path / "model", [4, 10], 16) == 16 - 10  # the longest prompt's room
    assert _generate_length(unset, tmp_path / "model", [4], 2048) == GENERATE_NEW_TOKENS == 64
    assert _generate_length(unset, tmp_path / "model", [4], None) == 64


def test_generate_chat_renders_the_template_and_is_refused_without_one(tmp_path, capsys):
    from lm_helpers import tiny_model
    from proximal.lm.loading import build_tiny_gpt2, save_pretrained

    tokenizer = chat_tokenizer()
    save_pretrained(build_tiny_gpt2(tokenizer, width=16, layers=1, heads=2, context=64), tokenizer, tmp_path / "chat")
    save_pretrained(*tiny_model(0), tmp_path / "plain")
    assert main(["generate", str(tmp_path / "chat"), "hi", "--chat", "--greedy", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hi -> ")  # the prompt as typed, then the reply to its template
    assert main(["generate", str(tmp_path / "plain"), "1+1=", "--chat"]) != 0
    err = capsys.readouterr().err
    assert "--chat needs a chat template" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--ppo.temperature", "--reward.sample-temperature"])
def test_a_temperature_that_would_overflow_the_logits_is_refused(flag, capsys):
    try:
        code = main(["rlhf", flag, "1e-45"])
    except SystemExit as exit_:
        code = exit_.code
    assert code != 0 and ">= 0.01" in capsys.readouterr().err


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path, capsys):
    from lm_helpers import tiny_model
    from proximal.errors import CheckpointError
    from proximal.lm.loading import load_pretrained

    model, _ = tiny_model(0)
    model.save_pretrained(tmp_path / "model")  # weights and config, no tokenizer
    with pytest.raises(CheckpointError, match="no tokenizer file"):
        load_pretrained(tmp_path / "model")


@pytest.mark.parametrize("damage", ["truncated safetensors", "pickled bin", "config is a list"])
def test_a_damaged_model_directory_is_one_line(tmp_path, damage):
    from lm_helpers import tiny_model
    from proximal.errors import CheckpointError
    from proximal.lm.loading import load_pretrained, save_pretrained

    model, tokenizer = tiny_model(0)
    save_pretrained(model, tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "pickled bin":  # a pickle that would run code if loaded without weights_only
        weights.unlink()
        (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    else:
        (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="holds no loadable causal LM") as raised:
        load_pretrained(tmp_path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("extra, sft_steps, reward_epochs, ppo_iterations, said", [
    # a pretrained model: 3 passes over each file; 300 demonstrations of 128 a step, 120 prompts less the
    # 10% held out (108) at 256 an iteration: ceil(900 / 128) = 8 steps, ceil(324 / 256) = 2 iterations
    (["--model.path", "{model}"], 8, 3, 2, "sft: 8 steps of 128 = 3.4 passes"),
    (["--model.path", "{model}", "--sft.steps", "50", "--ppo.iterations", "7"], 50, 3, 7, "(as given; --sft.steps"),
    ([], 1600, 8, 250, "= 682.7 passes over 300 demonstrations (the default for a model trained from scratch"),
])
def test_with_a_pretrained_model_the_stages_are_sized_by_passes_over_the_users_files(
        extra, sft_steps, reward_epochs, ppo_iterations, said, tmp_path, capsys):
    """Issue 38, item 8: the addition task's step counts are hundreds of passes over a 300-line
    file; from a pretrained model the stages take 3 (TRL's default epochs) unless a flag says
    otherwise, and the run's first lines say what each stage takes."""
    from proximal.cli import build_parser
    from proximal.lm.commands import rlhf_config

    files = ["--data.prompts", str(EXAMPLE / "prompts.jsonl"), "--data.sft", str(EXAMPLE / "sft.jsonl"),
             "--data.preferences", str(EXAMPLE / "preferences.jsonl")]
    lines: list[str] = []
    args = build_parser().parse_args(["rlhf", *files, *[arg.format(model=tmp_path) for arg in extra]])
    config = rlhf_config(args, lines)
    assert (config.sft.steps, config.reward.epochs, config.ppo.iterations) == (sft_steps, reward_epochs, ppo_iterations)
    assert len(lines) == 3 and any(said in line for line in lines), lines
    if sft_steps == 8:
        assert lines[0] == ("sft: 8 steps of 128 = 3.4 passes over 300 demonstrations "
                            "(3 passes, the default from a pretrained model; --sft.steps sets it)")
        assert math.ceil(3 * 300 / 128) == 8 and math.ceil(3 * 108 / 256) == 2
    builtin = rlhf_config(build_parser().parse_args(["rlhf", "--model.path", str(tmp_path)]), lines)
    assert builtin.sft.steps == 1600 and len(lines) == 3  # a built-in task keeps its own settings
