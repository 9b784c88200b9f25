"""Fixed-horizon versions of tasks whose episodes end early, for learning from preferences.

When an episode can end early, its length leaks the task: with CartPole's constant +1 reward two
clips differ only in whether the pole fell, and a reward learned from such labels learns little
(Christiano et al. 2017 removed all variable-length episodes for this reason). Here the episode
always runs to its time limit, and the true reward says whether the state is still inside the
original task's bounds, so a labeller's preference is informative at every step.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

FIXED_HORIZON_CARTPOLE_ID = "proximal/FixedHorizonCartPole-v1"


class FixedHorizonCartPole(CartPoleEnv):
    """CartPole-v1 that never terminates: each episode lasts the 500-step time limit, and the
    reward is 1 while |x| <= 2.4 and |theta| <= 12 degrees (CartPole's own bounds), else 0.
    The physics runs on unchanged after the pole falls (it may swing back up)."""

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, _, _, truncated, info = super().step(action)
        self.steps_beyond_terminated = None  # the parent's "stepped after termination" bookkeeping
        x, _, theta, _ = self.state
        inside = abs(x) <= self.x_threshold and abs(theta) <= self.theta_threshold_radians
        return observation, 1.0 if inside else 0.0, False, truncated, info


def register_fixed_horizon_envs() -> None:
    if FIXED_HORIZON_CARTPOLE_ID not in gym.registry:
        gym.register(id=FIXED_HORIZON_CARTPOLE_ID, entry_point=FixedHorizonCartPole, max_episode_steps=500)
