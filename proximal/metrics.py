"""Where per-iteration statistics go: metrics.csv, TensorBoard (when installed), a progress bar."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = (
    "iteration", "env_steps", "wall_seconds", "episodic_return", "episodic_length",
    "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
    "explained_variance", "epochs", "learning_rate", "steps_per_second", "eval_return",
)


def read_metrics(run_dir: Path) -> list[dict[str, float | None]]:
    """The rows of a run's metrics.csv as numbers (None where a cell is empty)."""
    with open(Path(run_dir) / METRICS_NAME, newline="") as file:
        return [{key: (float(value) if value != "" else None) for key, value in row.items()}
                for row in csv.DictReader(file)]


class MetricsLogger:
    """One CSV row per iteration, flushed at once so a crash loses nothing already logged.

    When resuming, rows past the checkpoint's iteration (work lost with the crash, about to be
    redone) are dropped first.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_iteration: int, start_step: int,
                 show_progress: bool, extra_columns: tuple[str, ...] = ()):
        path = Path(run_dir) / METRICS_NAME
        kept_rows = ([row for row in read_metrics(run_dir) if row["iteration"] <= start_iteration]
                     if path.exists() else [])
        self._columns = METRIC_COLUMNS + tuple(extra_columns)
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns)
        self._writer.writeheader()
        for row in kept_rows:
            self._writer.writerow({key: _format(value) for key, value in row.items()})
        self._file.flush()
        self._tensorboard = _tensorboard_writer(run_dir)
        self._progress = tqdm(total=total_steps, initial=start_step, unit="step", unit_scale=True,
                              disable=not show_progress, dynamic_ncols=True, leave=False)
        self._last_return: float | None = None

    def log(self, metrics: dict[str, Any]) -> None:
        self._writer.writerow({key: _format(metrics.get(key)) for key in self._columns})
        self._file.flush()
        if self._tensorboard is not None:
            for key in self._columns[2:]:
                if metrics.get(key) is not None:
                    self._tensorboard.add_scalar(key, metrics[key], metrics["env_steps"])
        if metrics.get("episodic_return") is not None:
            self._last_return = float(metrics["episodic_return"])
        self._progress.update(metrics["env_steps"] - self._progress.n)
        if self._last_return is not None:
            self._progress.set_postfix(mean_return=f"{self._last_return:.1f}", refresh=False)

    def close(self) -> None:
        self._progress.close()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _tensorboard_writer(run_dir: Path):
    """A SummaryWriter into the run directory, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir))
