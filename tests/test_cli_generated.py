"""A generated test of the command line: every subcommand and every flag of the parser itself,
each given values that are wrong for it, and every flag that names a file given files whose
contents are wrong in each way a file can be. Every case must end with a non-zero exit, exactly
one line on stderr that names the problem, no traceback, and nothing written; a case that reaches
real work (a rollout, an evaluation, a bench, an RLHF stage, sampling) fails the test instead of
running it; a plot that got through would write its PNG, which the test sees."""

import argparse
from pathlib import Path

import pytest

from proximal.cli import build_parser, main

# Values wrong for every flag of a type (ranges differ per flag, so only what no flag accepts).
BAD_VALUES = {
    "int": ["abc", "1.5", "", "nan", "-1", "1e400"],
    "float": ["abc", "", "nan", "inf", "-inf"],
    "optional_float": ["abc", "", "nan", "inf"],
    "optional_int": ["abc", "1.5", "", "-1", "0"],
    "str": ["", "{tmp}/a_file/below_a_file"],
    "choice": ["no-such-choice"],
    "flag": ["=1"],  # a switch given a value
    "_stage_list": ["", "nope", "ppo,ppo", "sft,,ppo", "all"],
}
EMPTY_MEANS_UNSET = {"--reward.replay-from", "--model.path", "--reward.function", "--data.prompts", "--data.sft",
                     "--data.preferences", "--data.eval-prompts", "--data.eval-preferences"}  # default "": not given
# Arguments that get each subcommand past its positionals (or fail there, which is also one line).
BASE = {
    "train": ["train"], "prefs": ["prefs"], "bench": ["bench"], "rlhf": ["rlhf"], "presets": ["presets"],
    "eval": ["eval", "{tmp}/no_run"], "plot": ["plot", "{tmp}/no_run"],
    "generate": ["generate", "{tmp}/no_model", "1+1="], "inspect": ["inspect", "{tmp}/no_run"],
    "study": ["study", "methods", "--study-dir", "{tmp}/study"],
}
BAD_POSITIONALS = {
    "train": [["train", ""], ["train", "../../etc"], ["train", "CartPol-v1"], ["train", " "]],
    "prefs": [["prefs", ""], ["prefs", "../../etc"], ["prefs", "nope/Nothing-v9"]],
    "bench": [["bench", ""], ["bench", "../../etc"]],
    "rlhf": [["rlhf", ""], ["rlhf", "subtraction"]],
    "eval": [["eval", ""], ["eval", "{tmp}/a_file"]],
    "plot": [["plot", ""], ["plot", "{tmp}/a_file"]],
    "generate": [["generate", "", "1+1="], ["generate", "{tmp}/a_file", "1+1="], ["generate", "{tmp}/no_model"]],
    "inspect": [["inspect", ""], ["inspect", "{tmp}/a_file"], ["inspect", "{tmp}"]],
    "study": [["study", "nope"], ["study"], ["study", "methods", "--out", "{tmp}/a_file"]],
}


def _kind(action: argparse.Action) -> str:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return "flag"
    if action.choices is not None:
        return "choice"
    return getattr(action.type, "__name__", "str") if action.type is not None else "str"


def generated_cases() -> list[tuple[str, list[str], str | None]]:
    """(case, argv, the flag the one line must name as typed: None for a positional)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    cases = []
    for command, subparser in commands.choices.items():
        cases.append((f"{command} unknown flag", [*BASE[command], "--no-such-flag"], "--no-such-flag"))
        for argv in BAD_POSITIONALS.get(command, []):
            cases.append((f"{command} positional {argv[1:]!r}", argv, None))
        for action in subparser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            for value in BAD_VALUES[_kind(action)]:
                if value == "" and flag in EMPTY_MEANS_UNSET:
                    continue
                argv = [*BASE[command], flag + value] if _kind(action) == "flag" else [*BASE[command], flag, value]
                cases.append((f"{command} {flag} {value!r}", argv, flag))
    return cases


CASES = generated_cases()

EXAMPLE_PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "positive_words" / "prompts.jsonl"
# What a JSON-lines file may hold that no reader can use, as bytes on disk.
BAD_JSON_LINES = {
    "empty": b"", "blank lines": b"\n \n\t\n", "not JSON": b"{not json\n", "an array": b"[1, 2]\n",
    "a string": b'"text"\n', "null": b"null\n", "deep nesting": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "a lone surrogate": b'{"prompt": "\\ud800"}\n', "not UTF-8": b'{"prompt": "caf\xe9"}\n',
    "NUL bytes": b"\x00\x00\x00\n", "UTF-16": '{"prompt": "a"}\n'.encode("utf-16"),
    "no known field": b'{"nothing": 1}\n', "a number too large": b'{"prompt": 1e999}\n',
    "a field of the wrong type": b'{"prompt": {"a": 1}, "completion": [], "chosen": 3, "rejected": null}\n',
    "a directory": None,
}
# Each flag (or positional) that names a file: the subcommand's arguments with {file} where it goes.
FILE_ARGUMENTS = {
    **{f"rlhf {flag}": ["rlhf", flag, "{file}"] for flag in ("--data.prompts", "--data.sft", "--data.preferences",
                                                             "--data.eval-prompts", "--data.eval-preferences")},
    "prefs --reward.replay-from": ["prefs", "--reward.labeller", "replay", "--reward.replay-from", "{file}"],
    "inspect RUN_DIR/ppo/snapshots.jsonl": ["inspect", "{tmp}/run"],
}


# A model file and a reward function's module, wrong in the ways they can be.
BAD_GGUF = {"empty": b"", "the magic alone": b"GGUF", "junk": b"not a model at all\n" * 10,
            "a header cut short": b"GGUF\x03\x00\x00\x00" + b"\x02" * 20, "a directory": None}
BAD_MODULES = {"a syntax error": b"def score(:\n", "a raise at import": b"raise RuntimeError('no')\n",
               "sys.exit at import": b"import sys\nsys.exit(0)\n", "no such callable": b"x = 1\n",
               "not callable": b"score = 3\n", "not UTF-8": b"# caf\xe9\ndef score(p, c): pass\n",
               "empty": b"", "a directory": None}


def file_cases() -> list[tuple[str, list[str], str, bytes | None]]:
    """(case, argv, the file's name, its content: None for a directory of that name)."""
    return [*[(f"{where} holding {what}", argv, "bad.jsonl", content) for where, argv in FILE_ARGUMENTS.items()
              for what, content in BAD_JSON_LINES.items()],
            *[(f"{where} holding {what}", argv, "bad.gguf", content) for where, argv in
              (("rlhf --model.path", ["rlhf", "sentiment", "--model.path", "{file}"]),
               ("generate MODEL", ["generate", "{file}", "hi"])) for what, content in BAD_GGUF.items()],
            *[(f"rlhf --reward.function holding {what}", ["rlhf", "--data.prompts", str(EXAMPLE_PROMPTS),
                                                          "--reward.function", "{file}:score"], "bad.py", content)
              for what, content in BAD_MODULES.items()]]


FILE_CASES = file_cases()


class WorkStarted(Exception):
    """Raised where a command would begin real work: a bad input got through."""


@pytest.fixture
def no_real_work(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise WorkStarted("a bad input reached real work")

    import proximal.bench
    import proximal.evaluate
    import proximal.lm.model
    import proximal.lm.pipeline
    import proximal.train

    monkeypatch.setattr(proximal.train, "collect_rollout", refuse)  # train and prefs check their env first
    monkeypatch.setattr(proximal.bench, "run_bench", refuse)
    monkeypatch.setattr(proximal.evaluate, "evaluate", refuse)
    monkeypatch.setattr(proximal.lm.model, "sample_completions", refuse)
    for stage in proximal.lm.pipeline.STAGES:
        monkeypatch.setitem(proximal.lm.pipeline.STAGES, stage, refuse)


def test_the_generated_table_covers_every_subcommand_and_hundreds_of_cases():
    assert {case.split()[0] for case, _, _ in CASES} == set(BASE)
    assert len(CASES) >= 300 and len(FILE_CASES) >= 100


def assert_one_line_and_nothing_written(case: str, argv: list[str], tmp_path, capsys, flag: str | None = None
                                        ) -> None:
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    try:
        code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code != 0, f"{case}: accepted"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"{case}: {captured.err!r}"
    assert lines[0].startswith("proximal"), lines[0]
    assert flag is None or flag in lines[0], f"{case}: the line does not name {flag} as typed: {lines[0]}"
    assert "Traceback" not in captured.err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case,argv,flag", CASES, ids=[case for case, _, _ in CASES])
def test_every_bad_input_is_one_line_naming_the_flag_nonzero_and_writes_nothing(case, argv, flag, tmp_path,
                                                                                monkeypatch, capsys, no_real_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    assert_one_line_and_nothing_written(case, argv, tmp_path, capsys, flag)


@pytest.mark.parametrize("case,argv,name,content", FILE_CASES, ids=[case for case, *_ in FILE_CASES])
def test_every_bad_file_is_one_line_nonzero_and_writes_nothing(case, argv, name, content, tmp_path, monkeypatch,
                                                               capsys, no_real_work):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run" / "ppo" / "snapshots.jsonl" if case.startswith("inspect") else tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert_one_line_and_nothing_written(case, [arg.replace("{file}", str(path)) for arg in argv], tmp_path, capsys)
