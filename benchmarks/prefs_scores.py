"""Scores of PPO on a reward learned from preferences, against PPO on the true reward. Long runs.

    python3 benchmarks/prefs_scores.py Pendulum-v1 --reward.labels 1000 --seeds 3 --out bench/prefs_pendulum
    python3 benchmarks/prefs_scores.py proximal/FixedHorizonCartPole-v1 --reward.labels 500 --seeds 3 --out ...
    python3 benchmarks/prefs_scores.py Pendulum-v1 --reward.labels 1000 --seeds 3 --ablations --out ...

For each seed, in the same invocation and with the env's preset and step budget:
  R_random   greedy-evaluation protocol applied to uniformly random actions (100 episodes),
  R_ppo_true `proximal train`: PPO on the env's reward,
  R          `proximal prefs`: PPO on the learned reward (each variant asked for),
all on the true reward, 100 episodes; score = (R - R_random) / (R_ppo_true - R_random).
Seeds run in parallel processes (`--jobs`, default 2), each on one torch thread.

Variants (--ablations adds the last three; Christiano et al. 2017, Section 3.3):
  full:         disagreement queries, ensemble of 3, 10% noise model
  random:       random queries
  single-model: one predictor (so random queries: disagreement needs an ensemble)
  no-noise:     plain Bradley-Terry, no 10% uniform-answer model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from proximal.flags import optional_float

VARIANTS = {
    "full": {},
    "random": {"query": "random"},
    "single-model": {"ensemble_size": 1, "query": "random"},
    "no-noise": {"model_error_rate": 0.0},
}


class RandomActions:
    """What proximal.evaluate needs of an agent: act(observations) -> actions (here uniform)."""

    def __init__(self, action_space, seed: int):
        self.action_space = action_space
        self.action_space.seed(seed)

    def act(self, observations: np.ndarray) -> np.ndarray:
        return np.stack([self.action_space.sample() for _ in range(len(observations))])


def random_return(env_id: str, seed: int, episodes: int) -> float:
    from proximal.envs import make_vector_env
    from proximal.evaluate import evaluate

    probe = make_vector_env(env_id, 1)
    action_space = probe.single_action_space
    probe.close()
    return float(evaluate(RandomActions(action_space, seed), env_id, episodes, seed=seed).mean())


def run_seed(env_id: str, seed: int, prefs_overrides: dict, variants: list[str], runs_dir: str) -> dict:
    import torch

    from proximal.presets import prefs_preset_for, preset_for
    from proximal.preferences import train_from_preferences
    from proximal.train import train

    torch.set_num_threads(1)
    config = preset_for(env_id).with_overrides({"run": {"seed": seed, "runs_dir": runs_dir, "eval_episodes": 100,
                                                        "stop_return": None}})
    true_result = train(config)
    row = {"seed": seed, "random": random_return(env_id, seed, 100),
           "ppo_true": float(true_result.eval_returns.mean()), "ppo_true_seconds": true_result.train_seconds,
           "variants": {}}
    for name in variants:
        prefs = dataclasses.replace(prefs_preset_for(env_id), **prefs_overrides, **VARIANTS[name])
        result, fit = train_from_preferences(config, prefs)
        value = float(result.eval_returns.mean())
        row["variants"][name] = {
            "return": value, "seconds": result.train_seconds, "labels": fit["labels"],
            "held_out_pearson": fit["pearson"], "run_dir": str(result.run_dir),
            "score": (value - row["random"]) / (row["ppo_true"] - row["random"]),
        }
        print(f"{env_id} seed {seed} {name}: return {value:.1f} (true-reward PPO {row['ppo_true']:.1f}, random "
              f"{row['random']:.1f}) score {row['variants'][name]['score']:.3f}", flush=True)
    return row


def markdown(env_id: str, prefs_overrides: dict, rows: list[dict], variants: list[str]) -> str:
    settings = "".join(f", {name} {value}" for name, value in prefs_overrides.items())
    lines = [f"{env_id}, the preset's preference settings{settings}; greedy 100-episode means on the true reward",
             "", "| variant | score per seed | median score | return per seed | labels | held-out Pearson | "
             "training s per run |", "|---|---|---|---|---|---|---|"]
    for name in variants:
        cells = [row["variants"][name] for row in rows]

        def joined(key: str, digits: int) -> str:
            return ", ".join(f"{cell[key]:.{digits}f}" for cell in cells)

        lines.append(f"| {name} | {joined('score', 3)} | {statistics.median(c['score'] for c in cells):.3f} | "
                     f"{joined('return', 1)} | {cells[0]['labels']} | {joined('held_out_pearson', 3)} | "
                     f"{statistics.median(c['seconds'] for c in cells):.0f} |")
    lines += ["", "| seed | R_random | R_ppo_true | true-reward PPO training s |", "|---|---|---|---|"]
    lines += [f"| {row['seed']} | {row['random']:.1f} | {row['ppo_true']:.1f} | {row['ppo_true_seconds']:.0f} |"
              for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("env_id")
    parser.add_argument("--reward.labels", dest="labels", type=int, default=argparse.SUPPRESS,
                        help="as `proximal prefs --reward.labels`; default: the preset's")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--reward.input-clip", dest="input_clip", type=optional_float, default=argparse.SUPPRESS,
                        metavar="FLOAT|none", help="as `proximal prefs --reward.input-clip`; default: the preset's")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--ablations", action="store_true", help="also the random, single-model, no-noise variants")
    parser.add_argument("--out", default=None, help="write prefs_scores.json and .md there, and keep the runs")
    args = parser.parse_args()
    variants = list(VARIANTS) if args.ablations else ["full"]
    prefs_overrides = {name: getattr(args, name) for name in ("labels", "input_clip") if hasattr(args, name)}
    out_dir = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = str(out_dir / "runs") if out_dir else scratch
        with ProcessPoolExecutor(args.jobs) as pool:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            rows = list(pool.map(run_seed, [args.env_id] * args.seeds, seeds, [prefs_overrides] * args.seeds,
                                 [variants] * args.seeds, [runs_dir] * args.seeds))
    table = markdown(args.env_id, prefs_overrides, rows, variants)
    print(table)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "prefs_scores.json").write_text(json.dumps(rows, indent=2))
        (out_dir / "prefs_scores.md").write_text(table)


if __name__ == "__main__":
    main()
