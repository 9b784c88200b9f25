import pytest
import torch

from toy_envs import register_toy_envs

register_toy_envs()


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on one torch thread, like training does by default."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_timed_progress_lines(monkeypatch):
    """A redirected stderr gets a progress line every 30 s (proximal.progress): how many a test's
    run prints would depend on the machine's speed, so none is printed unless a test asks."""
    monkeypatch.setattr("proximal.progress.LOG_EVERY_SECONDS", float("inf"))
