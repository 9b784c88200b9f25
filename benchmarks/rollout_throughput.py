"""Env steps per second of proximal's rollout loop (`train.collect_rollout`), one CPU thread.

    python3 benchmarks/rollout_throughput.py                 # CartPole-v1 with 8, 64 and 1,024 envs
    python3 benchmarks/rollout_throughput.py --envs 1024 --steps 256

Times the real rollout path: policy forward and sampling, the vectorised env step, the
bookkeeping of episode ends and autoresets, and the final value bootstrap. No update.
"""

from __future__ import annotations

import argparse
import time

import torch

from proximal.agent import PPOAgent
from proximal.presets import preset_for
from proximal.envs import make_vector_env
from proximal.train import EnvState, collect_rollout


def steps_per_second(env_id: str, num_envs: int, num_steps: int, repeats: int) -> float:
    envs = make_vector_env(env_id, num_envs)
    agent = PPOAgent.for_spaces(envs.single_observation_space, envs.single_action_space, preset_for(env_id))
    state = EnvState.after_reset(envs.reset(seed=0)[0])
    collect_rollout(agent, envs, state, num_steps)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        collect_rollout(agent, envs, state, num_steps)
        best = min(best, time.perf_counter() - start)
    envs.close()
    return num_envs * num_steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--envs", type=int, nargs="+", default=[8, 64, 1024])
    parser.add_argument("--steps", type=int, default=128, help="rollout length per env")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many rollouts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for num_envs in args.envs:
        rate = steps_per_second(args.env, num_envs, args.steps, args.repeats)
        print(f"{args.env}, {num_envs:>5} envs x {args.steps} steps: {rate:>12,.0f} env steps/s")


if __name__ == "__main__":
    main()
