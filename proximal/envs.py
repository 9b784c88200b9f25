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
import warnings

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


# Gymnasium's own HalfCheetah XML sets this attribute, which MuJoCo 4 deprecates: not the user's to fix
GYMNASIUM_OWN_MUJOCO_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)


def _mujoco_warning(message: str) -> None:
    if not message.startswith(GYMNASIUM_OWN_MUJOCO_WARNINGS):
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)  # shown once per message


def route_mujoco_warnings(env_id: str) -> None:
    """Send a MuJoCo env's warnings through Python's `warnings` module.

    MuJoCo's default handler prints every warning to stderr and appends it to MUJOCO_LOG.TXT in
    the user's working directory. Routed, a warning is shown once and no file is left behind;
    Gymnasium's own deprecated attributes are dropped.
    """
    try:
        entry_point = str(gym.spec(env_id).entry_point)
    except gym.error.Error:
        return  # an unknown id: make_vector_env says so
    if "mujoco" in entry_point:
        import mujoco

        mujoco.set_mju_user_warning(_mujoco_warning)


def make_env(env_id: str, **kwargs) -> gym.Env:
    """One env of `env_id` (`gym.make`), MuJoCo's warnings routed."""
    route_mujoco_warnings(env_id)
    return gym.make(env_id, **kwargs)


def make_vector_env(env_id: str, num_envs: int) -> VectorEnv:
    """N copies of `env_id` in NEXT_STEP autoreset mode.

    Uses the env's native vector implementation when it has one (CartPole steps 64 envs in one
    NumPy call), else SyncVectorEnv.
    """
    route_mujoco_warnings(env_id)
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
