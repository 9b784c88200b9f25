"""Checkpoints: atomic writes, refusal to run code, clear errors for missing or corrupt files."""

import os
import pickle

import pytest
import torch

import proximal.checkpoint as checkpoint_module
from proximal.checkpoint import load_checkpoint, save_checkpoint
from proximal.errors import CheckpointError


def test_round_trip(tmp_path):
    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "iteration": 7, "config": "{}"}
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    loaded = load_checkpoint(tmp_path)
    assert loaded["iteration"] == 7 and torch.equal(loaded["model"]["w"], payload["model"]["w"])


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_die(obj, file):
        real_save(obj, file)
        file.truncate(10)  # a torn write ...
        raise KeyboardInterrupt  # ... and then the kill

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint_module.CHECKPOINT_FORMAT, "x": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(CheckpointError, match="corrupt or not a proximal checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"format": "other"})])
def test_corrupt_or_foreign_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(path)


def test_foreign_torch_file_is_rejected(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a proximal checkpoint"):
        load_checkpoint(tmp_path / "model.pt")


def test_missing_paths_and_non_run_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not a proximal run directory"):
        load_checkpoint(tmp_path)
