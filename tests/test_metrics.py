"""metrics.csv format and the optional TensorBoard events."""

import csv

import pytest

from proximal.metrics import METRIC_COLUMNS, MetricsLogger, read_metrics


def test_csv_rows_are_flushed_with_empty_cells_for_missing_values(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=100, start_iteration=0, start_step=0, show_progress=False)
    logger.log({"iteration": 1, "env_steps": 50, "episodic_return": None, "policy_loss": float("nan"),
                "value_loss": 0.123456789})
    # flushed at once: readable before close, as after a crash
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == list(METRIC_COLUMNS)
    row = dict(zip(rows[0], rows[1]))
    assert (row["iteration"], row["env_steps"], row["episodic_return"], row["policy_loss"]) == ("1", "50", "", "")
    assert row["value_loss"] == "0.123457"
    logger.close()
    assert read_metrics(tmp_path)[0]["episodic_return"] is None


def test_resuming_drops_rows_past_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, 100, 0, 0, show_progress=False)
    for iteration in range(1, 6):
        logger.log({"iteration": iteration, "env_steps": 10 * iteration})
    logger.close()
    resumed = MetricsLogger(tmp_path, 100, start_iteration=3, start_step=30, show_progress=False)
    resumed.log({"iteration": 4, "env_steps": 40})
    resumed.close()
    assert [row["iteration"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_tensorboard_events_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, 100, 0, 0, show_progress=False)
    logger.log({"iteration": 1, "env_steps": 64, "episodic_return": 21.5, "entropy": 0.69})
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"episodic_return", "entropy"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("episodic_return")] == [(64, 21.5)]
