"""Learning curves: one run's `learning_curve.png`, and several runs compared in one figure."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from proximal.checkpoint import CONFIG_NAME  # noqa: E402
from proximal.errors import CheckpointError  # noqa: E402
from proximal.metrics import METRICS_NAME, read_metrics  # noqa: E402
from proximal.run import save_figure_atomic  # noqa: E402

LEARNING_CURVE_NAME = "learning_curve.png"


def _format_steps(axis) -> None:
    """Env-step ticks as 50k, 1.5M: long plain numbers run into each other."""
    def label(steps: float, _position: int) -> str:
        if abs(steps) >= 1e6:
            return f"{steps / 1e6:g}M"
        return f"{steps / 1e3:g}k" if abs(steps) >= 1e3 else f"{steps:g}"
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(label))


def _column_against_steps(rows: list[dict], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of the metrics rows where `column` has a value: episodic_return where
    episodes ended, eval_return where a greedy evaluation ran."""
    rows = [row for row in rows if row.get(column) is not None]
    return np.array([row["env_steps"] for row in rows]), np.array([row[column] for row in rows])


def plot_learning_curve(run_dir: Path) -> Path:
    """Episodic return and explained variance against env steps, saved in the run directory."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    steps, returns = _column_against_steps(rows, "episodic_return")
    figure, (return_axis, critic_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                                      gridspec_kw={"height_ratios": [2, 1]})
    return_axis.plot(steps, returns, color="C0", label="training rollouts (sampled actions)")
    eval_steps, eval_returns = _column_against_steps(rows, "eval_return")
    if len(eval_steps):
        return_axis.plot(eval_steps, eval_returns, "o", color="C1", markersize=4, label="greedy evaluation")
    return_axis.legend(loc="lower right", fontsize=8)
    return_axis.set_ylabel("mean episodic return")
    return_axis.set_title(run_dir.name)
    return_axis.grid(alpha=0.3)
    explained = [(row["env_steps"], row["explained_variance"]) for row in rows
                 if row["explained_variance"] is not None]
    if explained:
        critic_axis.plot(*zip(*explained), color="C1")
    critic_axis.set_ylabel("explained variance")
    critic_axis.set_xlabel("environment steps")
    _format_steps(critic_axis)
    critic_axis.grid(alpha=0.3)
    figure.tight_layout()
    path = run_dir / LEARNING_CURVE_NAME
    save_figure_atomic(figure, path)
    plt.close(figure)
    return path


def plot_runs(run_dirs: list[Path], out_path: Path) -> Path:
    """One panel per environment: the mean return across its runs (seeds) with a min-max band,
    each run interpolated onto a common grid of env steps."""
    runs_by_env: dict[str, list[Path]] = defaultdict(list)
    for run_dir in map(Path, run_dirs):
        if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / METRICS_NAME).is_file():
            raise CheckpointError(f"{run_dir} is not a proximal run directory (needs {CONFIG_NAME} and {METRICS_NAME})")
        env_id = json.loads((run_dir / CONFIG_NAME).read_text())["env"]["env_id"]
        runs_by_env[env_id].append(run_dir)

    figure, axes = plt.subplots(1, len(runs_by_env), figsize=(6 * len(runs_by_env), 4.2), squeeze=False)
    for axis, (env_id, env_runs) in zip(axes[0], sorted(runs_by_env.items())):
        rows_per_run = [read_metrics(run_dir) for run_dir in env_runs]
        curves = [curve for curve in (_column_against_steps(rows, "episodic_return") for rows in rows_per_run)
                  if len(curve[0]) > 0]
        if not curves:
            axis.set_title(f"{env_id}: no finished episodes yet")
            continue
        # Runs may stop at different steps (early stop at a target): mean and band are over the
        # runs still training at each step, and each run is drawn to its own end.
        grid = np.linspace(0, max(steps[-1] for steps, _ in curves), 300)  # [G]
        on_grid = np.stack([np.where(grid <= steps[-1], np.interp(grid, steps, returns), np.nan)
                            for steps, returns in curves])  # [runs, G], NaN after a run ended
        for steps, returns in curves:
            axis.plot(steps, returns, color="C0", alpha=0.25, linewidth=0.8)
        axis.plot(grid, np.nanmean(on_grid, 0), color="C0", label=f"mean of {len(curves)} run(s) still training")
        axis.fill_between(grid, np.nanmin(on_grid, 0), np.nanmax(on_grid, 0), color="C0", alpha=0.15,
                          label="min-max; thin lines: each run")
        evaluations = [_column_against_steps(rows, "eval_return") for rows in rows_per_run]
        if any(len(steps) for steps, _ in evaluations):
            axis.plot(np.concatenate([s for s, _ in evaluations]), np.concatenate([r for _, r in evaluations]),
                      "o", color="C1", markersize=3, label="greedy evaluations")
        axis.set_title(env_id)
        axis.set_xlabel("environment steps")
        _format_steps(axis)
        axis.set_ylabel("mean episodic return")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    out_path = Path(out_path)
    save_figure_atomic(figure, out_path)
    plt.close(figure)
    return out_path


PREFERENCE_CURVES_NAME = "preference_curves.png"


def plot_preference_curves(run_dir: Path) -> Path:
    """A preference run's true episodic return against env steps and against labels used, and
    the per-step correlation of learned and true reward in each rollout."""
    run_dir = Path(run_dir)
    rows = [row for row in read_metrics(run_dir) if row.get("episodic_return") is not None]
    steps = np.array([row["env_steps"] for row in rows])
    returns = np.array([row["episodic_return"] for row in rows])
    labels = np.array([row["labels"] for row in rows])
    correlation = np.array([np.nan if row["learned_true_correlation"] is None else row["learned_true_correlation"]
                            for row in rows])
    figure, (steps_axis, labels_axis, correlation_axis) = plt.subplots(1, 3, figsize=(15, 4))
    steps_axis.plot(steps, returns, color="C0")
    steps_axis.set_xlabel("environment steps")
    _format_steps(steps_axis)
    labels_axis.plot(labels, returns, ".", color="C0", markersize=3)
    labels_axis.set_xlabel("labels used")
    for axis in (steps_axis, labels_axis):
        axis.set_ylabel("true episodic return (training rollouts)")
        axis.grid(alpha=0.3)
    correlation_axis.plot(steps, correlation, color="C2")
    correlation_axis.set_ylim(-1.05, 1.05)
    correlation_axis.set_xlabel("environment steps")
    _format_steps(correlation_axis)
    correlation_axis.set_ylabel("corr(learned, true reward) per step")
    correlation_axis.grid(alpha=0.3)
    figure.suptitle(f"{run_dir.name}: PPO on a reward learned from preferences")
    figure.tight_layout()
    path = run_dir / PREFERENCE_CURVES_NAME
    save_figure_atomic(figure, path)
    plt.close(figure)
    return path


def plot_learned_vs_true(true_returns: np.ndarray, learned_returns: np.ndarray, fit: dict, path: Path) -> Path:
    """Scatter of held-out clips: summed learned reward against true return."""
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    axis.plot(true_returns, learned_returns, ".", alpha=0.5, markersize=4)
    if fit.get("pearson") is not None:
        axis.set_title(f"{fit['held_out_clips']} held-out clips: Pearson {fit['pearson']:.3f}, "
                       f"Spearman {fit['spearman']:.3f}", fontsize=10)
    axis.set_xlabel("true return of the clip")
    axis.set_ylabel("learned return of the clip (normalised r_hat, summed)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)
    return Path(path)
