"""Reading and writing checkpoints: atomically, and without ever running code on load.

A checkpoint is a dict of tensors, numbers and strings saved with `torch.save` and read back
with `torch.load(..., weights_only=True)`, which refuses pickled code. It is written to a
temporary file in the same directory and renamed over the old one, so a kill at any moment
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from proximal.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "proximal-checkpoint-v1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as temp_file:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint inside a run directory."""
    path = Path(path)
    if path.is_dir():
        checkpoint = path / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise CheckpointError(f"{path} is not a proximal run directory (no {CHECKPOINT_NAME} in it)")
        return checkpoint
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    return path


def _load_failure_reason(error: Exception) -> str:
    """One short reason. torch's weights-only refusal suggests retrying with weights_only=False,
    advice a user must not follow for a file that may run code, so it is not passed on."""
    message = str(error).strip()
    if message.startswith("Weights only load failed"):
        return "not readable as tensors and plain data, and proximal never unpickles anything else"
    return message.splitlines()[0][:160] if message else type(error).__name__


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file or a run directory's checkpoint; never executes pickled code."""
    checkpoint_path = resolve_checkpoint_path(path)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; our error says it all
            warnings.simplefilter("ignore")
            payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{checkpoint_path} is corrupt or not a proximal checkpoint "
                              f"({_load_failure_reason(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{checkpoint_path} is not a proximal checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload
