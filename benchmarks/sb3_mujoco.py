"""Wall time of Stable-Baselines3 and proximal on the same MuJoCo step budget. Optional.

    python3 -m pip install stable-baselines3 "gymnasium[mujoco]"   # not dependencies of proximal
    python3 benchmarks/sb3_mujoco.py HalfCheetah-v5 --timesteps 100000

Each library trains with its own tuned hyperparameters: SB3's PPO with RL Zoo's for the env
(below, VecNormalize on observations and rewards, as RL Zoo's `normalize: true`), proximal with
its preset. Both run one after the other in fresh processes, on one torch thread, for the same
number of env steps, with no evaluation; the ratio is SB3's training seconds over proximal's.
Both cost the same per step throughout a run (fixed-size rollouts and updates), so a 100k-step
slice gives the ratio of 1M-step runs without an hour of SB3.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time

# rl-baselines3-zoo hyperparams/ppo.yml (HalfCheetah-v3 and Hopper-v3 entries), gymnasium ids updated.
RL_ZOO = {
    "HalfCheetah-v5": dict(n_steps=512, batch_size=64, gamma=0.98, learning_rate=2.0633e-05, ent_coef=0.000401762,
                           clip_range=0.1, n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096,
                           policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation="relu",
                                              net_arch=dict(pi=[256, 256], vf=[256, 256]))),
    "Hopper-v5": dict(n_steps=512, batch_size=32, gamma=0.999, learning_rate=9.80828e-05, ent_coef=0.00229519,
                      clip_range=0.2, n_epochs=5, gae_lambda=0.99, max_grad_norm=0.7, vf_coef=0.835671,
                      policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation="relu",
                                         net_arch=dict(pi=[256, 256], vf=[256, 256]))),
}


def time_sb3(env_id: str, timesteps: int, seed: int) -> float:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    hyperparameters = dict(RL_ZOO[env_id])
    policy_kwargs = dict(hyperparameters.pop("policy_kwargs"))
    policy_kwargs["activation_fn"] = {"relu": torch.nn.ReLU}[policy_kwargs.pop("activation")]
    envs = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=hyperparameters["gamma"])
    model = PPO("MlpPolicy", envs, seed=seed, device="cpu", policy_kwargs=policy_kwargs, **hyperparameters)
    start = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    return time.perf_counter() - start


def time_proximal(env_id: str, timesteps: int, seed: int) -> float:
    from proximal.presets import preset_for
    from proximal.train import train

    with tempfile.TemporaryDirectory() as runs_dir:
        config = preset_for(env_id).with_overrides({"ppo": {"total_timesteps": timesteps},
                                                    "run": {"seed": seed, "runs_dir": runs_dir, "eval_episodes": 1}})
        return train(config).train_seconds


def in_fresh_process(function, *args) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("env_id", choices=sorted(RL_ZOO))
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sb3_seconds = in_fresh_process(time_sb3, args.env_id, args.timesteps, args.seed)
    proximal_seconds = in_fresh_process(time_proximal, args.env_id, args.timesteps, args.seed)
    print(json.dumps({"env_id": args.env_id, "timesteps": args.timesteps, "sb3_seconds": round(sb3_seconds, 1),
                      "proximal_seconds": round(proximal_seconds, 1),
                      "sb3_over_proximal": round(sb3_seconds / proximal_seconds, 2)}))


if __name__ == "__main__":
    main()
