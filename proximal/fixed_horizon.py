"""Fixed-horizon versions of tasks whose episodes end early, for learning from preferences.

When an episode can end early, its length leaks the task: with CartPole's constant +1 reward two
clips differ only in whether the pole fell, and a reward learned from such labels learns little
(Christiano et al. 2017 removed all variable-length episodes for this reason). Here the episode
always runs to its time limit, and the true reward says whether each step stayed inside the
original task's bounds, so a labeller's preference is informative.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

FIXED_HORIZON_CARTPOLE_ID = "proximal/FixedHorizonCartPole-v1"


class FixedHorizonCartPole(CartPoleEnv):
    """CartPole-v1 that never terminates: each episode lasts the 500-step time limit.

    A step within CartPole's bounds (|x| <= 2.4, |theta| <= 12 degrees) pays 1. A step that
    leaves them pays 0 and starts a fall: the physics runs on for `FALL_STEPS` more steps, paying
    0, and then the cart is put back at a fresh start state (as a reset would) and the episode goes
    on. So the return counts the steps spent balanced, and each fall costs 26 of them.

    Two simpler versions failed, measured: letting the physics run on for the rest of the episode
    left a poor policy's rollouts almost all "fallen" steps and 77% of labelled pairs ties (0 vs
    0), and PPO on the learned reward stayed at 57 of 500; putting the cart back at once made a
    fall cost one step, so uniformly random actions already scored 478 of 500.
    """

    FALL_STEPS = 25

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        self.fall_steps_left = 0
        return super().reset(**kwargs)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, _, out_of_bounds, truncated, info = super().step(action)
        self.steps_beyond_terminated = None  # the parent's "stepped after termination" bookkeeping
        if self.fall_steps_left > 0:  # falling: no reward until the cart is put back
            self.fall_steps_left -= 1
            if self.fall_steps_left == 0:
                self.state = self.np_random.uniform(low=-0.05, high=0.05, size=(4,))  # CartPole's reset
                observation = np.array(self.state, dtype=np.float32)
            return observation, 0.0, False, truncated, info
        if out_of_bounds:
            self.fall_steps_left = self.FALL_STEPS
            return observation, 0.0, False, truncated, info
        return observation, 1.0, False, truncated, info


def register_fixed_horizon_envs() -> None:
    if FIXED_HORIZON_CARTPOLE_ID not in gym.registry:
        gym.register(id=FIXED_HORIZON_CARTPOLE_ID, entry_point=FixedHorizonCartPole, max_episode_steps=500)
