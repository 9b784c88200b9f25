"""`proximal bench`: time to solve an environment, over seeds, by one fixed protocol.

For each seed, in a fresh Python process (so the whole-process time includes imports):
  1. take the env's preset, with that seed and one torch thread;
  2. train, evaluating the greedy policy on `eval_episodes` (100) episodes every `eval_every`
     iterations, with a fixed evaluation seed; evaluation time is not on the training clock;
  3. stop at the first evaluation whose mean reaches the threshold (the env's reward_threshold,
     475 for CartPole-v1), or when the preset's step budget runs out.
Seeds run one after another, never side by side, so they do not compete for cores.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from proximal.config import TrainConfig
from proximal.presets import PRESETS, preset_for
from proximal.errors import ConfigError
from proximal.run import save_figure_atomic, write_text_atomic


@dataclass(frozen=True)
class SeedResult:
    seed: int
    solved: bool
    env_steps: int
    train_seconds: float
    process_seconds: float
    eval_curve: list[tuple[float, float]]  # (training seconds, greedy mean return) at each evaluation

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "solved": self.solved, "env_steps": self.env_steps,
                "train_seconds": round(self.train_seconds, 4), "process_seconds": round(self.process_seconds, 3),
                "eval_curve": [[round(t, 4), round(r, 2)] for t, r in self.eval_curve]}


def reward_threshold(env_id: str) -> float:
    """What 'solved' means for `env_id`: Gymnasium's reward_threshold, else its preset's target."""
    import gymnasium as gym

    threshold = gym.spec(env_id).reward_threshold
    if threshold is None and env_id in PRESETS:
        threshold = PRESETS[env_id].target_return
    if threshold is None:
        raise ConfigError(f"{env_id} defines no reward_threshold and has no preset target; give one with --threshold")
    return float(threshold)


def bench_config(env_id: str, seed: int, threshold: float, eval_every: int, runs_dir: str) -> TrainConfig:
    return preset_for(env_id).with_overrides({"run": {
        "seed": seed, "threads": 1, "stop_return": threshold, "eval_every": eval_every,
        "eval_episodes": 100, "runs_dir": runs_dir, "checkpoint_every": 10**9,
    }})


def _train_one_seed(config: TrainConfig) -> dict[str, Any]:
    """Runs in the child process: train, then read the evaluation curve from the run's metrics."""
    from proximal.metrics import read_metrics
    from proximal.train import train

    result = train(config)
    curve = [(row["wall_seconds"], row["eval_return"]) for row in read_metrics(result.run_dir)
             if row["eval_return"] is not None]
    return {"solved": result.reached_stop_return,
            "env_steps": result.global_step, "train_seconds": result.train_seconds, "eval_curve": curve}


def run_bench(env_id: str, seeds: int, threshold: float, eval_every: int, runs_dir: Path,
              on_seed: Callable[[SeedResult], None] = lambda result: None) -> list[SeedResult]:
    """The protocol above for seeds 0..seeds-1; `on_seed` sees each result as it arrives."""
    results = []
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: imports are timed too
    for seed in range(seeds):
        config = bench_config(env_id, seed, threshold, eval_every, str(runs_dir))
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            outcome = pool.submit(_train_one_seed, config).result()
        result = SeedResult(seed=seed, process_seconds=time.perf_counter() - start, **outcome)
        on_seed(result)
        results.append(result)
    return results


def summary(results: list[SeedResult]) -> dict[str, float]:
    solved = [r for r in results if r.solved]
    seconds = [r.train_seconds for r in solved]
    steps = [r.env_steps for r in solved]
    return {
        "solved": len(solved), "seeds": len(results),
        "median_train_seconds": float(np.median(seconds)) if solved else float("nan"),
        "max_train_seconds": float(np.max(seconds)) if solved else float("nan"),
        "median_env_steps": float(np.median(steps)) if solved else float("nan"),
        "max_env_steps": float(np.max(steps)) if solved else float("nan"),
        "median_process_seconds": float(np.median([r.process_seconds for r in results])),
    }


def markdown_table(env_id: str, threshold: float, results: list[SeedResult]) -> str:
    lines = [f"`proximal bench {env_id}` (threshold {threshold:g}, greedy 100-episode mean)", "",
             "| seed | solved | env steps | training s | whole process s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.seed} | {'yes' if r.solved else 'no'} | {r.env_steps:,} | {r.train_seconds:.2f} | "
                     f"{r.process_seconds:.2f} |")
    s = summary(results)
    lines.append(f"| **median** | {s['solved']}/{s['seeds']} | {s['median_env_steps']:,.0f} | "
                 f"{s['median_train_seconds']:.2f} | {s['median_process_seconds']:.2f} |")
    lines.append(f"| **max** | | {s['max_env_steps']:,.0f} | {s['max_train_seconds']:.2f} | |")
    return "\n".join(lines) + "\n"


def plot_bench(env_id: str, threshold: float, results: list[SeedResult], path: Path) -> Path:
    from proximal.plots import plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for r in results:
        if r.eval_curve:
            seconds, returns = zip(*r.eval_curve)
            axis.plot(seconds, returns, marker=".", linewidth=1, label=f"seed {r.seed}")
    axis.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    axis.set(xlabel="training seconds (evaluation excluded)", ylabel="greedy mean return, 100 episodes",
             title=f"proximal bench {env_id}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)
    return path


def write_outputs(out_dir: Path, env_id: str, threshold: float, results: list[SeedResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "bench.json", json.dumps({
        "env_id": env_id, "threshold": threshold, "summary": summary(results),
        "seeds": [r.to_dict() for r in results]}, indent=2))
    write_text_atomic(out_dir / "bench.md", markdown_table(env_id, threshold, results))
    plot_bench(env_id, threshold, results, out_dir / "bench.png")


def bench_runs_dir(out_dir: Path | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """Where the seeds' run directories go: under --out if given, else a temporary directory."""
    if out_dir is not None:
        return out_dir / "runs", None
    temporary = tempfile.TemporaryDirectory(prefix="proximal-bench-")
    return Path(temporary.name), temporary
