"""proximal bench: the protocol's config, the summary and the report files."""

import json
import math

import pytest

from proximal.bench import SeedResult, bench_config, markdown_table, reward_threshold, summary, write_outputs
from proximal.presets import preset_for
from proximal.errors import ConfigError


def results():
    return [
        SeedResult(0, True, 15_360, 0.6, 2.0, [(0.3, 120.0), (0.6, 500.0)]),
        SeedResult(1, True, 10_240, 0.4, 1.8, [(0.4, 480.0)]),
        SeedResult(2, False, 100_000, 3.0, 4.0, [(1.0, 200.0)]),
    ]


def test_the_protocol_is_the_preset_with_one_thread_and_a_greedy_stop():
    config = bench_config("CartPole-v1", seed=3, threshold=475.0, eval_every=5, runs_dir="somewhere")
    preset = preset_for("CartPole-v1")
    assert config.ppo == preset.ppo and config.env == preset.env
    assert (config.run.seed, config.run.threads, config.run.stop_return) == (3, 1, 475.0)
    assert (config.run.eval_every, config.run.eval_episodes) == (5, 100)


def test_threshold_comes_from_gymnasium():
    assert reward_threshold("CartPole-v1") == 475.0
    assert reward_threshold("Acrobot-v1") == -100.0
    assert reward_threshold("Pendulum-v1") == -200.0  # no reward_threshold: the preset's target
    with pytest.raises(ConfigError, match="defines no reward_threshold and has no preset target"):
        reward_threshold("proximal-test/Truncated-v0")


def test_summary_counts_only_solved_seeds_for_time_and_steps():
    totals = summary(results())
    assert (totals["solved"], totals["seeds"]) == (2, 3)
    assert totals["median_train_seconds"] == pytest.approx(0.5)
    assert totals["max_train_seconds"] == 0.6
    assert totals["median_env_steps"] == 12_800 and totals["max_env_steps"] == 15_360
    assert totals["median_process_seconds"] == 2.0
    assert math.isnan(summary([SeedResult(0, False, 1, 1.0, 1.0, [])])["median_train_seconds"])


def test_report_files(tmp_path):
    write_outputs(tmp_path, "CartPole-v1", 475.0, results())
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["env_id"] == "CartPole-v1" and data["threshold"] == 475.0
    assert data["seeds"][0] == {"seed": 0, "solved": True, "env_steps": 15360, "train_seconds": 0.6,
                                "process_seconds": 2.0, "eval_curve": [[0.3, 120.0], [0.6, 500.0]]}
    table = (tmp_path / "bench.md").read_text()
    assert "| 2 | no | 100,000 | 3.00 | 4.00 |" in table
    assert "| **median** | 2/3 | 12,800 | 0.50 | 2.00 |" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert markdown_table("CartPole-v1", 475.0, results()) == table
