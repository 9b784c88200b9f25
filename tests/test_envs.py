"""Building vector envs: NEXT_STEP autoreset, clear errors for what proximal cannot handle."""

import subprocess
import sys

import gymnasium as gym
import pytest
from gymnasium.vector import AutoresetMode

from proximal.envs import make_vector_env
from proximal.errors import EnvError


def test_cartpole_uses_its_native_vector_env_in_next_step_mode():
    envs = make_vector_env("CartPole-v1", 16)
    assert type(envs).__name__ == "CartPoleVectorEnv" and envs.num_envs == 16
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    envs.close()


def test_unknown_env_suggests_close_names():
    with pytest.raises(EnvError, match="unknown environment 'CartPol-v1'; did you mean CartPole-v1"):
        make_vector_env("CartPol-v1", 2)
    with pytest.raises(EnvError, match="unknown environment 'NoSuchThing-v0'"):
        make_vector_env("NoSuchThing-v0", 2)


def test_unsupported_spaces_are_named():
    with pytest.raises(EnvError, match="unsupported observation space Tuple"):
        make_vector_env("Blackjack-v1", 2)
    with pytest.raises(EnvError, match="unsupported observation space Discrete"):
        make_vector_env("FrozenLake-v1", 2)
    with pytest.raises(EnvError, match="unsupported action space MultiBinary"):
        make_vector_env("proximal-test/MultiBinaryAction-v0", 2)


def test_continuous_box_actions_are_supported():
    envs = make_vector_env("Pendulum-v1", 2)
    assert envs.single_action_space.shape == (1,)
    envs.close()


def test_missing_optional_dependency_is_one_clear_error():
    try:
        import Box2D  # noqa: F401
    except ImportError:
        with pytest.raises(EnvError, match="LunarLander-v3 needs an extra dependency"):
            make_vector_env("LunarLander-v3", 2)
    else:
        pytest.skip("Box2D is installed here")


@pytest.mark.filterwarnings("ignore:.*out of date:DeprecationWarning")
def test_deprecated_versions_point_to_the_new_one():
    with pytest.raises(EnvError, match="v3"):
        make_vector_env("LunarLander-v2", 2)
    assert "LunarLander-v3" in gym.registry


MUJOCO_NOISE = """
import numpy as np
from proximal.envs import make_env, make_vector_env
envs = make_vector_env("HalfCheetah-v5", 2)
envs.reset(seed=0)
envs.close()
env = make_env("Walker2d-v5")
env.reset(seed=0)
env.unwrapped.set_state(env.unwrapped.init_qpos, np.full(env.unwrapped.model.nv, 1e30))  # blows up
for _ in range(3):
    env.step(env.action_space.sample())
"""


def test_mujoco_envs_leave_no_log_file_and_drop_gymnasiums_own_deprecation(tmp_path):
    """MuJoCo 4 prints a warning per env about Gymnasium's own XML (`settotalmass`) and appends
    every warning to MUJOCO_LOG.TXT in the working directory. Routed through Python's warnings:
    Gymnasium's deprecation is dropped, a real one (an unstable simulation) is said once, no file."""
    pytest.importorskip("mujoco")
    done = subprocess.run([sys.executable, "-c", MUJOCO_NOISE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "settotalmass" not in done.stderr
    assert done.stderr.count("RuntimeWarning: MuJoCo: Nan, Inf or huge value in QVEL") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []
