"""The same seed gives the same run as before issue 38's refactor (the configuration language,
the command line and the module splits): metrics and weights against numbers recorded on the
commits before it (tests/recorded/before_issue38.json says which), to the 6 digits metrics.csv
keeps. Another CPU or torch build may follow another trajectory from the same seed: these are
the project's machine's, as every recorded figure is."""

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest

from proximal.config import EnvConfig, PPOConfig, RunConfig, TrainConfig
from proximal.train import train

RECORDED = json.loads((Path(__file__).parent / "recorded" / "before_issue38.json").read_text())


def close(recorded: str, now: str) -> bool:
    """Two metrics.csv cells (6 significant digits) hold the same number."""
    if recorded == "" or now == "":
        return recorded == now
    return float(now) == pytest.approx(float(recorded), rel=2e-6, abs=1e-9)


@pytest.mark.parametrize("env_id, extra", [
    ("CartPole-v1", {}),
    ("Pendulum-v1", {"normalize_observations": True, "normalize_rewards": True}),
])
def test_a_control_run_is_the_one_recorded_before_the_refactor(env_id, extra, tmp_path):
    from proximal.agent import PPOAgent

    config = TrainConfig(env=EnvConfig(env_id, num_envs=2),
                         ppo=PPOConfig(total_timesteps=384, num_steps=64, minibatch_size=64, learning_rate=1e-3,
                                       epochs=3, **extra),
                         run=RunConfig(seed=3, eval_episodes=2, runs_dir=str(tmp_path)))
    result = train(config)
    recorded = RECORDED["control"][env_id]
    with open(result.run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(recorded["rows"])
    for row, then in zip(rows, recorded["rows"]):
        assert all(close(then[key], row[key]) for key in then), (row, then)
    assert [float(x) for x in result.eval_returns] == pytest.approx(recorded["eval"], rel=1e-6)
    weights = sum(p.detach().abs().double().sum() for p in PPOAgent.load(result.run_dir).network.parameters())
    assert float(weights) == pytest.approx(recorded["weights_abs_sum"], rel=1e-9)


def test_an_rlhf_run_is_the_one_recorded_before_the_refactor(tmp_path):
    pytest.importorskip("transformers")
    from proximal.cli import main
    from proximal.lm.loading import load_pretrained

    run = tmp_path / "run"
    flags = ["--task.demonstrations", "500", "--task.eval-prompts", "40", "--model.width", "32", "--model.heads", "2",
             "--sft.steps", "300", "--sft.batch-size", "32", "--reward.labels", "200", "--reward.epochs", "2",
             "--ppo.iterations", "4", "--ppo.prompts-per-iteration", "32", "--ppo.minibatch-size", "16",
             "--ppo.eval-every", "2", "--ppo.relabel-every", "2", "--ppo.relabel-pairs", "16", "--ppo.refit-steps", "2",
             "--threads", "1", "--seed", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rlhf", "--run-dir", str(run), *flags]) == 0
    for stage in ("sft", "reward", "ppo"):
        with open(run / stage / "metrics.csv") as file:
            rows = [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(file)]
        recorded = RECORDED["lm"][stage]
        assert len(rows) == len(recorded) and all(row.keys() == then.keys() for row, then in zip(rows, recorded))
        for row, then in zip(rows, recorded):
            assert all(close(then[key], row[key]) for key in then), (stage, row, then)
    model, _ = load_pretrained(run / "ppo" / "model")
    weights = sum(p.detach().abs().double().sum() for p in model.parameters())
    assert float(weights) == pytest.approx(RECORDED["lm"]["ppo_weights_abs_sum"], rel=1e-9)


def test_an_rlhf_runs_config_json_given_back_runs_it_again_row_for_row(tmp_path):
    """`proximal rlhf --config RUN_DIR/config.json --run-dir OTHER` is that run again: every
    stage's metrics.csv row for row (the timing columns aside) and the same final weights."""
    pytest.importorskip("transformers")
    from proximal.cli import main
    from proximal.lm.loading import load_pretrained

    flags = ["--task.demonstrations", "300", "--task.eval-prompts", "16", "--model.width", "32", "--model.heads", "2",
             "--sft.steps", "120", "--sft.batch-size", "32", "--reward.labels", "80", "--reward.epochs", "1",
             "--ppo.iterations", "2", "--ppo.prompts-per-iteration", "16", "--ppo.minibatch-size", "8",
             "--ppo.eval-every", "2", "--ppo.relabel-every", "0", "--threads", "1", "--seed", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rlhf", "--run-dir", str(tmp_path / "first"), *flags]) == 0
        assert main(["rlhf", "--config", str(tmp_path / "first" / "config.json"),
                     "--run-dir", str(tmp_path / "again")]) == 0
    for stage in ("sft", "reward", "ppo"):
        runs = []
        for run in ("first", "again"):
            with open(tmp_path / run / stage / "metrics.csv") as file:
                runs.append([{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(file)])
        assert runs[0] == runs[1] and len(runs[0]) > 0, stage
    weights = [sum(p.detach().abs().double().sum() for p in load_pretrained(tmp_path / run / "ppo" / "model")[0]
                   .parameters()) for run in ("first", "again")]
    assert float(weights[0]) == float(weights[1])
