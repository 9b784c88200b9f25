"""Building vectorised Gymnasium environments, and checking proximal can handle them.

Autoreset: every vector env here runs in Gymnasium's NEXT_STEP mode (the only mode of CartPole's
native vector env, and the default of SyncVectorEnv). After a step that ends an episode, the
returned observation is the episode's *final* observation; the following `step` call ignores its
action, resets that sub-env and returns reward 0 with terminated = truncated = False. The
training loop marks those reset transitions invalid and keeps them out of the loss
(`train.collect_rollout`).
"""

from __future__ import annotations

import difflib

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from proximal.errors import EnvError
from proximal.fixed_horizon import register_fixed_horizon_envs

register_fixed_horizon_envs()  # `proximal/FixedHorizonCartPole-v1` works wherever envs are made


def _unknown_env_message(env_id: str) -> str:
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    if not close:
        return f"unknown environment {env_id!r}; `gymnasium.pprint_registry()` lists the known ones"
    names = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f"unknown environment {env_id!r}; did you mean {names}?"


def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
    """Raise EnvError unless observations are flat Boxes and actions Discrete or flat Boxes."""
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise EnvError(f"{env_id}: unsupported observation space {observation_space}; "
                       "proximal needs a 1-D Box (flat vector) observation")
    flat_box = isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
    if not (isinstance(action_space, gym.spaces.Discrete) or flat_box):
        raise EnvError(f"{env_id}: unsupported action space {action_space}; "
                       "proximal needs a Discrete or a 1-D Box action space")


def make_vector_env(env_id: str, num_envs: int) -> VectorEnv:
    """N copies of `env_id` in NEXT_STEP autoreset mode.

    Uses the env's native vector implementation when it has one (CartPole steps 64 envs in one
    NumPy call), else SyncVectorEnv.
    """
    try:
        envs = gym.make_vec(env_id, num_envs=num_envs)
    except (gym.error.UnregisteredEnv, gym.error.DeprecatedEnv) as error:
        if isinstance(error, gym.error.DeprecatedEnv):
            raise EnvError(str(error)) from None
        raise EnvError(_unknown_env_message(env_id)) from None
    except gym.error.DependencyNotInstalled as error:
        raise EnvError(f"{env_id} needs an extra dependency: {error}") from None
    except gym.error.Error as error:  # e.g. "Malformed environment ID" for ../../etc
        raise EnvError(f"{env_id!r} is not a Gymnasium environment id ({str(error).split('. ')[0]})") from None
    try:
        check_spaces(env_id, envs.single_observation_space, envs.single_action_space)
        mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode != AutoresetMode.NEXT_STEP:
            raise EnvError(f"{env_id}: vector env autoreset mode {mode} is not supported (NEXT_STEP only)")
    except EnvError:
        envs.close()
        raise
    return envs


def as_float_observations(observations: np.ndarray) -> np.ndarray:
    """Observations as contiguous float32, the dtype the networks take."""
    return np.ascontiguousarray(observations, dtype=np.float32)
