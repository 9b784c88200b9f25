"""Regenerate the figures of notes/week1_answers.md from the project's own code.

    python notes/make_figures.py clip                # Figure 1 of the PPO paper, and its gradient (instant)
    python notes/make_figures.py critic --seeds 5    # CartPole with and without the critic (~2 min on 2 cores)
    python notes/make_figures.py sparse --seeds 3    # CartPole's reward paid every step or at the end (~4 min)

Figures land in notes/figures/; the critic runs in notes/runs/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import gymnasium as gym
import matplotlib
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.wrappers import TimeLimit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proximal.losses import clipped_surrogate_loss  # noqa: E402
from proximal.config import EnvConfig, PPOConfig, TrainConfig  # noqa: E402
from proximal.metrics import read_metrics  # noqa: E402
from proximal.train import train  # noqa: E402

NOTES = Path(__file__).parent
FIGURES = NOTES / "figures"
CLIP = 0.2

# The runs of the notes use this fixed CartPole configuration (RL Zoo-like: short horizon, many
# epochs), pinned here so the figures reproduce whatever the presets become. Fixed 100k-step
# budget, no early stop: the curves show all of training.
NOTES_CARTPOLE = TrainConfig(
    env=EnvConfig(env_id="CartPole-v1", num_envs=8),
    ppo=PPOConfig(total_timesteps=100_000, num_steps=32, learning_rate=1e-3, gamma=0.98, gae_lambda=0.8,
                  epochs=10, minibatch_size=256, ent_coef=0.0),
)


def objective_and_gradient(ratios: np.ndarray, advantage: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample L^CLIP(r) = -clipped_surrogate_loss, and dL^CLIP/dr by autograd, at each ratio."""
    values, gradients = [], []
    for ratio in ratios:
        r = torch.tensor([ratio], dtype=torch.float64, requires_grad=True)
        objective = -clipped_surrogate_loss(torch.log(r), torch.zeros(1, dtype=torch.float64),
                                            torch.tensor([advantage], dtype=torch.float64), CLIP)
        objective.backward()
        values.append(objective.item())
        gradients.append(r.grad.item())
    return np.array(values), np.array(gradients)


def clip_figure() -> Path:
    ratios = np.linspace(0.4, 1.6, 1201)
    figure, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for column, advantage in enumerate((1.0, -1.0)):
        values, gradients = objective_and_gradient(ratios, advantage)
        top, bottom = axes[0, column], axes[1, column]
        top.plot(ratios, ratios * advantage, color="0.6", linestyle="--", label="unclipped  r A")
        top.plot(ratios, values, color="C0", linewidth=2, label="L^CLIP = min(r A, clip(r) A)")
        bottom.plot(ratios, gradients, color="C3", linewidth=2)
        zero = (advantage > 0) & (ratios > 1 + CLIP) | (advantage < 0) & (ratios < 1 - CLIP)
        for axis in (top, bottom):
            axis.axvline(1.0, color="k", linewidth=0.6)
            for edge in (1 - CLIP, 1 + CLIP):
                axis.axvline(edge, color="k", linewidth=0.6, linestyle=":")
            axis.fill_between(ratios, 0, 1, where=zero, transform=axis.get_xaxis_transform(),
                              color="C3", alpha=0.08)
            axis.grid(alpha=0.3)
        top.set_title(f"A {'> 0' if advantage > 0 else '< 0'}  (A = {advantage:+.0f}, eps = {CLIP})")
        top.legend(loc="upper left" if advantage > 0 else "upper right", fontsize=8)
        bottom.set_xlabel("probability ratio r = pi_new / pi_old")
        bottom.set_ylim(-1.3, 1.3)
    axes[0, 0].set_ylabel("objective (maximised)")
    axes[1, 0].set_ylabel("dL^CLIP / dr (autograd)")
    figure.suptitle("Clipped surrogate objective (Schulman et al. 2017, Eq. 7 / Figure 1); "
                    "shaded: zero gradient", fontsize=10)
    figure.tight_layout()
    path = FIGURES / "clip_objective.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# An experiment is a few variants of NOTES_CARTPOLE, each trained on seeds 0..n-1:
# {variant name: (env id, {PPOConfig field: value})}.
Variants = dict[str, tuple[str, dict]]
GRID = np.linspace(0, NOTES_CARTPOLE.num_iterations * NOTES_CARTPOLE.batch_size, 120)  # env steps


def _train_variant(job: tuple[str, str, str, dict, int]) -> tuple[str, str, float]:
    experiment, name, env_id, overrides, seed = job
    runs_dir = NOTES / "runs" / experiment / re.sub(r"[^\w.-]+", "-", name).strip("-")
    result = train(NOTES_CARTPOLE.with_overrides(
        {"env": {"env_id": env_id}, "ppo": overrides, "run": {"seed": seed, "runs_dir": str(runs_dir)}}))
    return name, str(result.run_dir), float(result.eval_returns.mean())


def train_variants(experiment: str, variants: Variants, seeds: int) -> dict[str, list[tuple[Path, float]]]:
    """Train every variant on every seed, two at a time, into a fresh notes/runs/<experiment>/.

    Returns {variant: [(run directory, final greedy mean return), ...]} in seed order."""
    shutil.rmtree(NOTES / "runs" / experiment, ignore_errors=True)
    jobs = [(experiment, name, env_id, overrides, seed)
            for name, (env_id, overrides) in variants.items() for seed in range(seeds)]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_train_variant, jobs))
    return {name: [(Path(run_dir), final) for n, run_dir, final in results if n == name] for name in variants}


def plot_return_curves(axis, runs_by_variant: dict[str, list[tuple[Path, float]]]) -> dict:
    """Mean and min-max of the training-rollout return of each variant; returns the summary."""
    summary = {}
    for color, (name, runs) in zip(("C0", "C3", "C2", "C1"), runs_by_variant.items()):
        curves = []
        for run_dir, _ in runs:
            rows = [row for row in read_metrics(run_dir) if row["episodic_return"] is not None]
            curves.append(np.interp(GRID, [row["env_steps"] for row in rows], [row["episodic_return"] for row in rows]))
        curves = np.stack(curves)  # [seeds, G]
        axis.plot(GRID, curves.mean(0), color=color, label=f"{name}, mean of {len(runs)} seeds")
        axis.fill_between(GRID, curves.min(0), curves.max(0), color=color, alpha=0.15)
        summary[name] = {"final_greedy_means": [round(final, 1) for _, final in runs]}
    axis.set(xlabel="environment steps", ylabel="mean episodic return (training rollouts)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    return summary


def save(figure, name: str, summary: dict) -> Path:
    figure.tight_layout()
    path = FIGURES / f"{name}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    (FIGURES / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return path


CRITIC_VARIANTS: Variants = {
    "with critic (GAE, lambda 0.8)": ("CartPole-v1", {}),
    "no critic (plain returns, lambda 1)": ("CartPole-v1", {"use_critic": False, "gae_lambda": 1.0, "vf_coef": 0.0}),
}


def critic_figure(seeds: int) -> Path:
    runs_by_variant = train_variants("critic", CRITIC_VARIANTS, seeds)
    figure, (return_axis, critic_axis) = plt.subplots(1, 2, figsize=(11, 4))
    summary = plot_return_curves(return_axis, runs_by_variant)
    return_axis.set_title("CartPole-v1: PPO with and without the critic")
    explained = []
    for run_dir, _ in runs_by_variant["with critic (GAE, lambda 0.8)"]:
        rows = read_metrics(run_dir)
        steps = [row["env_steps"] for row in rows]
        values = [row["explained_variance"] for row in rows]
        critic_axis.plot(steps, values, color="C0", alpha=0.15, linewidth=0.8)
        explained.append(np.interp(GRID, steps, values))
    critic_axis.plot(GRID, np.median(np.stack(explained), 0), color="C0", linewidth=2,
                     label=f"median of {len(explained)} seeds (faint: each seed)")
    critic_axis.set(xlabel="environment steps", ylabel="explained variance of V on the batch",
                    title="the critic learns: explained variance", ylim=(-1, 1.05))
    critic_axis.legend(loc="lower right", fontsize=8)
    critic_axis.grid(alpha=0.3)
    return save(figure, "critic_ablation", summary)


class PayAtEpisodeEnd(gym.Wrapper):
    """Holds back every reward and pays the episode's total on its last step (ended or cut): the
    same return as CartPole, delivered like an LLM's sequence-level score."""

    def reset(self, **kwargs):
        self.held_back = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.held_back += float(reward)
        if terminated or truncated:
            reward, self.held_back = self.held_back, 0.0
        else:
            reward = 0.0
        return observation, reward, terminated, truncated, info


def make_sparse_cartpole(**kwargs) -> gym.Env:
    return PayAtEpisodeEnd(TimeLimit(CartPoleEnv(**kwargs), max_episode_steps=500))


SPARSE_ENV_ID = "notes/CartPoleSparse-v1"
gym.register(SPARSE_ENV_ID, entry_point=make_sparse_cartpole)
REWARD_VARIANTS: Variants = {
    "dense, gamma 0.98": ("CartPole-v1", {}),
    "sparse, gamma 0.98": (SPARSE_ENV_ID, {}),
    "dense, gamma 1": ("CartPole-v1", {"gamma": 1.0}),
    "sparse, gamma 1": (SPARSE_ENV_ID, {"gamma": 1.0}),
}


def sparse_figure(seeds: int) -> Path:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    summary = plot_return_curves(axis, train_variants("sparse", REWARD_VARIANTS, seeds))
    axis.set_title("CartPole-v1: the same return, paid every step (dense) or at the end (sparse)")
    return save(figure, "sparse_reward", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["clip", "critic", "sparse"])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    FIGURES.mkdir(exist_ok=True)
    makers = {"clip": clip_figure, "critic": lambda: critic_figure(args.seeds),
              "sparse": lambda: sparse_figure(args.seeds)}
    print(makers[args.figure]())


if __name__ == "__main__":
    main()
