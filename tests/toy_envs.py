"""Tiny environments with hand-checkable dynamics, registered with Gymnasium for the tests.

CounterEnv: the observation is [k], the number of steps taken in the episode so far; every step
pays `reward` (NaN once `nan_reward_after` total steps have passed, to provoke a diverging
loss). It terminates when k reaches `terminate_at`, and the TimeLimit wrapper from registration
truncates it at `max_episode_steps`. Two actions, both ignored by the dynamics.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class CounterEnv(gym.Env):
    def __init__(self, terminate_at: int | None = None, reward: float = 1.0,
                 nan_reward_after: int | None = None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.terminate_at = terminate_at
        self.reward = reward
        self.nan_reward_after = nan_reward_after
        self.total_steps = 0
        self.k = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([self.k], dtype=np.float32), {}

    def step(self, action):
        self.k += 1
        self.total_steps += 1
        reward = self.reward
        if self.nan_reward_after is not None and self.total_steps > self.nan_reward_after:
            reward = float("nan")
        terminated = self.terminate_at is not None and self.k >= self.terminate_at
        return np.array([self.k], dtype=np.float32), reward, terminated, False, {}


class TupleObservationEnv(CounterEnv):
    """Same dynamics, but an observation space proximal does not support."""

    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Tuple((gym.spaces.Discrete(3), gym.spaces.Discrete(2)))


class MultiBinaryActionEnv(CounterEnv):
    """Same dynamics, but an action space proximal does not support."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.MultiBinary(3)


def register_toy_envs() -> None:
    if "proximal-test/Truncated-v0" in gym.registry:
        return
    # Never terminates; truncated by the time limit after 3 steps.
    gym.register("proximal-test/Truncated-v0", entry_point=CounterEnv, max_episode_steps=3)
    # Terminates after 3 steps, well before its time limit.
    gym.register("proximal-test/Terminated-v0", entry_point=CounterEnv, max_episode_steps=100,
                 kwargs={"terminate_at": 3})
    gym.register("proximal-test/MultiBinaryAction-v0", entry_point=MultiBinaryActionEnv, max_episode_steps=10)
    gym.register("proximal-test/NaNReward-v0", entry_point=CounterEnv, max_episode_steps=50,
                 kwargs={"nan_reward_after": 600})
