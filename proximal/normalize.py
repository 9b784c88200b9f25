"""Running statistics for observation normalisation and reward scaling.

Both are switched on per run (`--ppo.normalize-observations`, `--ppo.normalize-rewards`) and live in the
agent, so they are saved in its checkpoint; observation statistics are frozen when the agent
acts outside training.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RunningMeanStd:
    """Mean and (population) variance of a stream of arrays, merged a batch at a time
    (the parallel algorithm of Chan, Golub and LeVeque 1979): equal to NumPy's over the stream."""

    def __init__(self, shape: tuple[int, ...]):
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)  # before any data: the identity transform
        self.count = 0
        self.gather = None  # data-parallel training: every rank's rows of a batch (`DistContext.gather_rows`)

    def update(self, batch: np.ndarray) -> None:
        """Fold in `batch` [B, *shape] (with `gather` set: every rank's batch, in rank order)."""
        batch = np.asarray(batch, dtype=np.float64)
        self.fold(batch if self.gather is None else self.gather(batch))

    def fold(self, batch: np.ndarray) -> None:
        """Fold in `batch` [B, *shape] as it is (already every rank's, when training on several)."""
        batch = np.asarray(batch, dtype=np.float64)
        batch_count = batch.shape[0]
        batch_mean, batch_var = batch.mean(axis=0), batch.var(axis=0)
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, batch_count
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * batch_count / total
        self.var = (self.var * self.count + batch_var * batch_count
                    + delta ** 2 * self.count * batch_count / total) / total
        self.count = total

    def normalize(self, values: np.ndarray, clip: float = 10.0) -> np.ndarray:
        """(values - mean) / std, clipped to [-clip, clip], as float32."""
        scaled = (values - self.mean) / np.sqrt(self.var + 1e-8)
        return np.clip(scaled, -clip, clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.var = np.asarray(state["var"], dtype=np.float64)
        self.count = int(state["count"])


class RewardScaler:
    """Divides each reward by the running std of the discounted return
    R_t = gamma R_{t-1} + r_t (reset at episode ends), one R per env: the reward scaling that
    Engstrom et al. 2020 found PPO's MuJoCo results depend on. The mean is not subtracted, so
    the sign of every reward is kept."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.discounted_returns = np.zeros(num_envs)  # [N]
        self.return_stats = RunningMeanStd(())

    def scale(self, rewards: np.ndarray, episode_ended: np.ndarray) -> np.ndarray:
        """Scaled rewards [T, N] for T steps of N envs, in order; `episode_ended` [T, N] resets
        an env's R after its step. Each step's R of every env is folded into the statistics
        before that step's rewards are divided. Training on several ranks, one gather brings
        every rank's R for all T steps (their R depend on their own rewards only)."""
        returns = np.empty(rewards.shape)  # [T, N] R_t, float64
        for t in range(rewards.shape[0]):
            self.discounted_returns = self.gamma * self.discounted_returns + rewards[t]
            returns[t] = self.discounted_returns
            self.discounted_returns[episode_ended[t]] = 0.0
        stats = self.return_stats
        every_rank = returns if stats.gather is None else stats.gather(returns.T).T  # [T, K N] in rank order
        scaled = np.empty(rewards.shape, dtype=np.float32)
        for t in range(rewards.shape[0]):
            stats.fold(every_rank[t])
            scaled[t] = rewards[t] / np.sqrt(stats.var + 1e-8)
        return scaled
