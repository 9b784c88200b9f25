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
    """CartPole-v1 that never terminates: each episode lasts the 500-step time limit. The reward
    is 1 for a step that stays within CartPole's bounds (|x| <= 2.4, |theta| <= 12 degrees) and 0
    for one that leaves them; leaving them puts the cart back at a fresh start state (as a reset
    would) and the episode goes on. So the return counts the steps spent balanced, and a clip's
    true return says how often the pole fell in it.

    (Letting the physics run on after a fall instead leaves a poor policy's rollouts almost all
    "fallen" steps, and nearly every labelled pair a tie: measured, that learned nothing.)
    """

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, _, fell, truncated, info = super().step(action)
        self.steps_beyond_terminated = None  # the parent's "stepped after termination" bookkeeping
        if fell:
            self.state = self.np_random.uniform(low=-0.05, high=0.05, size=(4,))  # CartPole's reset
            observation = np.array(self.state, dtype=np.float32)
        return observation, 0.0 if fell else 1.0, False, truncated, info


def register_fixed_horizon_envs() -> None:
    if FIXED_HORIZON_CARTPOLE_ID not in gym.registry:
        gym.register(id=FIXED_HORIZON_CARTPOLE_ID, entry_point=FixedHorizonCartPole, max_episode_steps=500)
