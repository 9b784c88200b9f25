import pytest
import torch

from toy_envs import register_toy_envs

register_toy_envs()


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on one torch thread, like training does by default."""
    torch.set_num_threads(1)
