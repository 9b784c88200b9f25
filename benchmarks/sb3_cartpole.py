"""Stable-Baselines3 under `proximal bench`'s protocol, for a side-by-side ratio. Optional.

    python3 -m pip install stable-baselines3      # not a dependency of proximal; tests never need it
    python3 benchmarks/sb3_cartpole.py --seeds 10 --out bench/sb3

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    seeds = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            outcome = pool.submit(train_one_seed, seed).result()
        outcome.update(seed=seed, process_seconds=time.perf_counter() - start)
        seeds.append(outcome)
        print(f"seed {seed}: {'solved' if outcome['solved'] else 'NOT solved'} after {outcome['env_steps']:,} env steps, "
              f"{outcome['train_seconds']:.2f} s training, {outcome['process_seconds']:.2f} s whole process", flush=True)
    solved = [s for s in seeds if s["solved"]]
    if solved:
        seconds = [s["train_seconds"] for s in solved]
        steps = [s["env_steps"] for s in solved]
        print(f"SB3 solved {len(solved)}/{len(seeds)}; training seconds median {statistics.median(seconds):.2f} "
              f"(max {max(seconds):.2f}); env steps median {statistics.median(steps):,.0f} (max {max(steps):,}); "
              f"whole process median {statistics.median(s['process_seconds'] for s in seeds):.2f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(
            {"env_id": "CartPole-v1", "threshold": THRESHOLD, "library": "stable-baselines3", "seeds": seeds}, indent=2))


if __name__ == "__main__":
    main()
