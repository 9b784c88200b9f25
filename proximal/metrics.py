"""Where per-iteration statistics go: metrics.csv, TensorBoard (when installed), a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proximal.progress import progress
from proximal.run import CsvLog, read_csv_rows

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = (
    "iteration", "env_steps", "wall_seconds", "episodic_return", "episodic_length",
    "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
    "explained_variance", "epochs", "learning_rate", "steps_per_second", "eval_return",
)


def read_metrics(run_dir: Path) -> list[dict[str, float | None]]:
    """The rows of a run's metrics.csv as numbers (None where a cell is empty)."""
    return read_csv_rows(Path(run_dir) / METRICS_NAME)


class MetricsLogger:
    """One CSV row per iteration, flushed at once so a crash loses nothing already logged.

    When resuming, rows past the checkpoint's iteration (work lost with the crash, about to be
    redone) are dropped first, by an atomic rewrite (`proximal.run.CsvLog`): a kill at that
    moment leaves the old file or the new one, never a truncated history.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_iteration: int, start_step: int,
                 show_progress: bool, extra_columns: tuple[str, ...] = ()):
        path = Path(run_dir) / METRICS_NAME
        self._columns = METRIC_COLUMNS + tuple(extra_columns)
        self._csv = CsvLog(path, self._columns, "iteration", start_iteration if path.exists() else None)
        self._tensorboard = _tensorboard_writer(run_dir)
        self._progress = progress(total_steps, "train", show_progress, initial=start_step, unit_scale=True)
        self._last_return: float | None = None

    def log(self, metrics: dict[str, Any]) -> None:
        self._csv.log(metrics)
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
        self._csv.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(run_dir: Path):
    """A SummaryWriter into the run directory, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir))
