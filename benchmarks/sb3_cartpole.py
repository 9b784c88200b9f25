"""Stable-Baselines3 under `proximal bench`'s protocol, for a side-by-side ratio. Optional.

    python3 -m pip install stable-baselines3      # not a dependency of proximal; tests never need it
    python3 benchmarks/sb3_cartpole.py --seeds 10 --rounds 3 --out bench/sb3

Each round runs `proximal bench CartPole-v1`'s protocol on seeds 0..seeds-1 (proximal.bench), then
SB3's on the same seeds, so a machine that slows down mid-way slows both; the ratio of the two
median training times is taken per round, then its median and range over the rounds.

SB3's PPO with RL Zoo's tuned CartPole-v1 hyperparameters (8 envs, n_steps 32, batch 256,
20 epochs, gamma 0.98, lambda 0.8, lr and clip annealed linearly from 1e-3 and 0.2, 100k steps),
one torch thread, each seed in a fresh process. Every 2 rollouts (512 env steps; `proximal
bench` checks its preset every 5 iterations = 640 env steps, so SB3 is checked at least as often)
the greedy policy is evaluated on 100 episodes by proximal's own `evaluate` (same envs, same
seeds, same code as `proximal bench`), off the training clock; a seed is solved at the first
mean >= 475.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

THRESHOLD = 475.0
EVAL_EVERY_ROLLOUTS = 2  # 512 env steps; proximal's preset checks every 640: SB3 gets the finer grain


def train_one_seed(seed: int) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from proximal.evaluate import evaluate

    torch.set_num_threads(1)

    class GreedySB3:
        """What proximal.evaluate needs: act(observations) -> greedy actions."""

        def __init__(self, model):
            self.model = model

        def act(self, observations):
            return self.model.predict(observations, deterministic=True)[0]

    class EvaluateAndStop(BaseCallback):
        def __init__(self):
            super().__init__()
            self.rollouts, self.eval_seconds, self.curve, self.solved = 0, 0.0, [], False
            self.start = time.perf_counter()

        def _on_step(self) -> bool:
            return not self.solved  # False stops model.learn

        def _on_rollout_end(self) -> None:
            self.rollouts += 1

        def _on_rollout_start(self) -> None:  # after the previous rollout's update
            if self.rollouts == 0 or self.rollouts % EVAL_EVERY_ROLLOUTS:
                return
            began = time.perf_counter()
            training_seconds = began - self.start - self.eval_seconds
            mean = float(evaluate(GreedySB3(self.model), "CartPole-v1", 100, seed=seed).mean())
            self.eval_seconds += time.perf_counter() - began
            self.curve.append((training_seconds, mean))
            if mean >= THRESHOLD:
                self.solved, self.env_steps_at_solve, self.seconds_at_solve = True, self.num_timesteps, training_seconds

    def linear(start: float):
        return lambda progress_remaining: progress_remaining * start

    envs = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO("MlpPolicy", envs, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu")
    callback = EvaluateAndStop()
    model.learn(total_timesteps=100_000, callback=callback)
    if callback.solved:
        env_steps, train_seconds = callback.env_steps_at_solve, callback.seconds_at_solve
    else:
        env_steps, train_seconds = model.num_timesteps, time.perf_counter() - callback.start - callback.eval_seconds
    return {"solved": callback.solved, "env_steps": int(env_steps), "train_seconds": train_seconds,
            "eval_curve": callback.curve}


def sb3_seeds(seeds: int) -> list[dict]:
    """SB3 on seeds 0..seeds-1, one after another, each in a fresh process (imports timed)."""
    spawn = multiprocessing.get_context("spawn")
    results = []
    for seed in range(seeds):
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            outcome = pool.submit(train_one_seed, seed).result()
        outcome.update(seed=seed, process_seconds=time.perf_counter() - start)
        results.append(outcome)
        print(f"  SB3 seed {seed}: {'solved' if outcome['solved'] else 'NOT solved'} after {outcome['env_steps']:,} "
              f"env steps, {outcome['train_seconds']:.2f} s training, {outcome['process_seconds']:.2f} s whole process",
              flush=True)
    return results


def median_of_solved(results: list[dict], key: str) -> float:
    solved = [r[key] for r in results if r["solved"]]
    return statistics.median(solved) if solved else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="proximal then SB3, this many times")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from proximal.bench import reward_threshold, run_bench

    rounds = []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as runs_dir:
            ours = [r.to_dict() for r in run_bench("CartPole-v1", args.seeds, reward_threshold("CartPole-v1"), 5,
                                                   Path(runs_dir))]
        print(f"round {round_index + 1}: proximal solved {sum(r['solved'] for r in ours)}/{len(ours)}, median "
              f"{median_of_solved(ours, 'train_seconds'):.2f} s of training", flush=True)
        theirs = sb3_seeds(args.seeds)
        ratio = median_of_solved(theirs, "train_seconds") / median_of_solved(ours, "train_seconds")
        print(f"round {round_index + 1}: SB3 solved {sum(r['solved'] for r in theirs)}/{len(theirs)}, median "
              f"{median_of_solved(theirs, 'train_seconds'):.2f} s of training; SB3 / proximal {ratio:.2f}x", flush=True)
        rounds.append({"proximal": ours, "sb3": theirs, "ratio": ratio})
    ratios = [r["ratio"] for r in rounds]
    ours_medians = ", ".join(f"{median_of_solved(r['proximal'], 'train_seconds'):.2f}" for r in rounds)
    their_medians = ", ".join(f"{median_of_solved(r['sb3'], 'train_seconds'):.2f}" for r in rounds)
    print(f"SB3 / proximal, median training time to solve: {statistics.median(ratios):.2f}x over {len(ratios)} "
          f"round(s) (range {min(ratios):.2f}-{max(ratios):.2f}); proximal medians {ours_medians} s, "
          f"SB3 {their_medians} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(
            {"env_id": "CartPole-v1", "threshold": THRESHOLD, "library": "stable-baselines3", "rounds": rounds},
            indent=2))


if __name__ == "__main__":
    main()
