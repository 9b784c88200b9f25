"""The `proximal` command: bad input is one line and writes nothing; the main job end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proximal.checkpoint import save_checkpoint
from proximal.cli import main

SHORT_RUN = ["--ppo.total-timesteps", "2048", "--env.num-envs", "4", "--ppo.num-steps", "64", "--ppo.minibatch-size", "128",
             "--eval-episodes", "5"]


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prepare(tmp_path, kind):
    """Files some bad inputs need in place: returns the path argument to use."""
    if kind == "empty_dir":
        (tmp_path / "not_a_run").mkdir()
        return "not_a_run"
    if kind == "corrupt":
        run = tmp_path / "corrupt_run"
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(b"\x80\x02garbage that is no checkpoint")
        return "corrupt_run"
    if kind == "file":
        (tmp_path / "a_file").write_text("not a directory")
        return "a_file"
    if kind == "other_dir":
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
        return "photos"
    if kind == "truncated":
        run = tmp_path / "torn_run"
        run.mkdir()
        save_checkpoint(run / "checkpoint.pt", {"iteration": 1})
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        return "torn_run"
    return "missing_run"


BAD_INPUTS = [
    # (argv with {path} placeholder, what must be set up, a fragment of the one line printed)
    (["train", "CartPol-v1"], None, "did you mean CartPole-v1"),
    (["train", "Blackjack-v1"], None, "unsupported observation space"),
    (["train", "proximal-test/MultiBinaryAction-v0"], None, "unsupported action space MultiBinary"),
    (["train", "--ppo.clip-coef", "0"], None, "--ppo.clip-coef must be > 0"),
    (["train", "--ppo.gamma", "1.5"], None, r"gamma must be in \[0, 1\]"),
    (["train", "--ppo.gae-lambda", "-0.5"], None, r"--ppo.gae-lambda must be in \[0, 1\]"),
    (["train", "--ppo.minibatch-size", "100000"], None, "--ppo.minibatch-size must be <= the batch"),
    (["train", "--ppo.total-timesteps", "0"], None, "--ppo.total-timesteps must be a positive integer"),
    (["train", "--env.num-envs", "-2"], None, "--env.num-envs must be a positive integer"),
    (["train", "--ppo.learning-rate", "nan"], None, "--ppo.learning-rate must be a finite number"),
    (["train", "--env.num-envs", "abc"], None, "invalid int value"),
    (["train", "--no-such-flag"], None, "unrecognized arguments"),
    (["eval", "{path}"], "missing", "no such run directory or checkpoint"),
    (["eval", "{path}"], "empty_dir", "is not a proximal run directory"),
    (["eval", "{path}"], "corrupt", "corrupt or not a proximal checkpoint"),
    (["eval", "{path}"], "truncated", "corrupt or not a proximal checkpoint"),
    (["eval", "{path}", "--episodes", "0"], "empty_dir", "--episodes must be a positive integer"),
    (["train", "--run-dir", "{path}"], "file", "--run-dir a_file: a_file is not a directory"),
    (["train", "--run-dir", "{path}"], "other_dir", "--run-dir photos holds no proximal train run"),
    (["prefs", "--run-dir", "{path}"], "other_dir", "--run-dir photos holds no proximal prefs run"),
    (["train", "--run-dir", "{path}"], "corrupt", "corrupt or not a proximal checkpoint"),
    (["train", "--run-dir", "{path}", "--ppo.clip-coef", "0"], "missing", "--ppo.clip-coef must be > 0"),
    (["plot", "{path}"], "empty_dir", "is not a proximal run directory"),
    (["bench", "CartPol-v1"], None, "did you mean CartPole-v1"),
    (["bench", "--seeds", "0"], None, "--seeds must be a positive integer"),
    (["bench", "proximal-test/MultiBinaryAction-v0", "--threshold", "1"], None, "unsupported action space"),
    (["train", "--stop-return", "inf"], None, "--stop-return must be a finite number"),
    (["prefs", "Pendulm-v1"], None, "did you mean Pendulum-v1"),
    (["prefs", "--reward.query", "loudest"], None, "query must be disagreement or random"),
    (["prefs", "--reward.ensemble-size", "1"], None, "query must be random with a single predictor"),
    (["prefs", "--reward.labels", "0"], None, "labels must be a positive integer"),
    (["prefs", "--reward.model-error-rate", "1"], None, r"--reward.model-error-rate must be in \[0, 1\)"),
    (["prefs", "--reward.segment-length", "300"], None, "--reward.segment-length must be <= --ppo.num-steps = 256"),
    (["prefs", "--reward.labeller", "replay"], None, "--reward.replay-from must be a comparisons.jsonl exactly when --reward.labeller replay"),
    (["prefs", "--reward.labeller", "replay", "--reward.replay-from", "{path}"], "missing", "no such file"),
    (["train", "../../etc"], None, "'../../etc' is not a Gymnasium environment id"),
    (["eval", "{path}", "--gif", "/no/such/dir/x.gif"], "empty_dir", "--gif /no/such/dir/x.gif: no such directory"),
    (["plot", "{path}", "--out", "/no/such/dir/x.png"], "empty_dir", "--out /no/such/dir/x.png: no such directory"),
]


@pytest.mark.parametrize("argv,setup,message", BAD_INPUTS)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(argv, setup, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = prepare(tmp_path, setup) if setup else None
    before = files_under(tmp_path)
    code, out, err = run_main([arg.format(path=path) for arg in argv], capsys)
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert files_under(tmp_path) == before


def test_the_installed_command_prints_one_line_for_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "proximal", "train", "CartPol-v1"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == ("proximal train: error: unknown environment 'CartPol-v1'; "
                                     "did you mean CartPole-v1, CartPole-v0 or phys2d/CartPole-v1?")
    assert list(tmp_path.iterdir()) == []


def test_run_dir_starts_a_run_there_then_continues_it_refusing_changed_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "my" / "run"
    assert run_main(["train", *SHORT_RUN, "--run-dir", str(run_dir)], capsys)[0] == 0
    assert {"config.json", "checkpoint.pt", "eval.json"} <= set(files_under(run_dir)) and not (tmp_path / "runs").exists()
    assert run_dir.stat().st_mode & 0o777 == 0o700
    code, _, err = run_main(["train", "CartPole-v1", "--run-dir", str(run_dir)], capsys)
    assert code == 1 and "continues its run's own environment; drop ENV_ID" in err
    code, _, err = run_main(["train", "--run-dir", str(run_dir), "--ppo.clip-coef", "0.1", "--seed", "2"], capsys)
    assert code == 1 and "only --ppo.total-timesteps (or --dist-timeout) may change, not --ppo.clip-coef, --seed" in err
    code, _, err = run_main(["train", "--run-dir", str(run_dir)], capsys)
    assert code == 1 and "already finished its 2048 steps" in err
    code, out, _ = run_main(["train", "--run-dir", str(run_dir), "--ppo.total-timesteps", "4096"], capsys)
    assert code == 0 and "4,096 env steps" in out


def test_flags_override_the_preset_and_are_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["train", "CartPole-v1", *SHORT_RUN, "--seed", "3", "--ppo.hidden-sizes", "32",
                             "--no-ppo.anneal-lr", "--ppo.early-stop-kl", "0.05"], capsys)
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("CartPole-v1__3__")
    from proximal.agent import PPOAgent

    config = PPOAgent.load(run_dir).config
    assert config.ppo.hidden_sizes == (32,) and config.ppo.anneal_lr is False
    assert config.ppo.early_stop_kl == 0.05 and config.env.num_envs == 4 and config.run.seed == 3


@pytest.mark.parametrize("command", ["train", "prefs"])
def test_a_flag_of_the_flat_dialect_is_refused_with_its_new_name(command, tmp_path, monkeypatch, capsys):
    """Every flat flag of an earlier version (each config field's old name, bool switches both
    ways, --resume) is one line naming the flag that replaced it, and nothing runs."""
    from proximal.flags import retired_flags
    from proximal.config import PREFS_SECTIONS, TRAIN_SECTIONS

    monkeypatch.chdir(tmp_path)
    retired = retired_flags(TRAIN_SECTIONS if command == "train" else PREFS_SECTIONS)
    expected = {"--clip-coef": "--ppo.clip-coef", "--update-epochs": "--ppo.epochs", "--target-kl": "--ppo.early-stop-kl",
                "--num-envs": "--env.num-envs", "--no-anneal-lr": "--no-ppo.anneal-lr", "--resume": "--run-dir"}
    if command == "prefs":
        expected |= {"--reward-learning-rate": "--reward.learning-rate", "--labels": "--reward.labels",
                     "--labeller": "--reward.labeller", "--learning-rate": "--ppo.learning-rate"}
    assert expected.items() <= retired.items()
    assert "--seed" not in retired and "--env-id" not in retired
    for old, new in retired.items():
        code, out, err = run_main([command, f"{old}=1"], capsys)
        assert (code, out) == (2, "") and err == f"proximal {command}: error: {old} is now {new} (see proximal {command} --help)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_train_solves_cartpole_then_eval_plot_and_gif(tmp_path):
    """The README's main job: `proximal train` with no flags, then `proximal eval`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.run([sys.executable, "-m", "proximal", "train"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    run_dir = Path(tmp_path, re.search(r"run directory: (\S+)", train.stdout).group(1))
    assert {"config.json", "metrics.csv", "checkpoint.pt", "learning_curve.png"} <= set(os.listdir(run_dir))

    evaluation = subprocess.run([sys.executable, "-m", "proximal", "eval", str(run_dir), "--episodes", "100",
                                 "--gif", "episode.gif"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert evaluation.returncode == 0, evaluation.stderr
    mean = float(re.search(r"100 episodes: mean ([\d.]+)", evaluation.stdout).group(1))
    assert mean >= 475, evaluation.stdout
    assert (tmp_path / "episode.gif").stat().st_size > 0

    plot = subprocess.run([sys.executable, "-m", "proximal", "plot", str(run_dir), "--out", "curves.png"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_smoke_two_seeds(tmp_path):
    """Not a timed test: the bench runs its protocol and writes its report."""
    result = subprocess.run([sys.executable, "-m", "proximal", "bench", "--seeds", "2", "--out", "bench"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "seed 0: solved" in result.stdout and "seed 1: solved" in result.stdout
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [seed["seed"] for seed in report["seeds"]] == [0, 1]
    assert all(seed["solved"] and seed["env_steps"] > 0 for seed in report["seeds"])
    assert {"bench.md", "bench.png", "runs"} <= set(os.listdir(tmp_path / "bench"))


def test_presets_lists_every_preset_and_the_generic_defaults(capsys):
    from proximal.presets import PRESETS

    code, out, _ = run_main(["presets"], capsys)
    assert code == 0
    for env_id, preset in PRESETS.items():
        assert f"{env_id} (v{preset.version}): " in out
    assert "CartPole-v1 (v1): 8 envs x 16 steps, 4 epochs of minibatch 128, lr 0.003" in out
    assert "any other env id trains with the generic defaults: 4 envs x 128 steps" in out


@pytest.mark.parametrize("argv, labels, input_clip", [
    (["prefs", "HalfCheetah-v5"], 1400, None),  # the preset's preference settings
    (["prefs", "HalfCheetah-v5", "--reward.labels", "700", "--reward.input-clip", "10"], 700, 10.0),  # flags win
    (["prefs", "Pendulum-v1"], 1000, 10.0),  # no preference settings in the preset: PrefsConfig's defaults
])
def test_prefs_starts_from_the_presets_preference_settings(argv, labels, input_clip, monkeypatch, capsys):
    import proximal.preferences

    class Started(Exception):
        pass

    def record(config, prefs, **_options):
        raise Started(prefs)

    monkeypatch.setattr(proximal.preferences, "train_from_preferences", record)
    with pytest.raises(Started) as started:
        main(argv)
    prefs = started.value.args[0]
    assert (prefs.labels, prefs.input_clip) == (labels, input_clip)


def test_presets_shows_preference_settings_that_differ_from_the_defaults(capsys):
    code, out, _ = run_main(["presets"], capsys)
    assert code == 0 and "proximal prefs starts from: --reward.labels 1400 --reward.input-clip none" in out
    assert "proximal prefs starts from: --reward.segment-length 8" in out  # CartPole-v1's short clips
    assert out.count("proximal prefs starts from") == 2
