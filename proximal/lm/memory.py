"""Memory: how many rows one forward and backward pass may take, and how much a stage held.

A training pass keeps every block's activations for the backward pass: on SmolLM2-135M (30
blocks, width 576) about 1 MB per token, measured here (16 rows of 67 tokens: +1.06 GB forward,
+1.2 GB with the backward). The RL stage's batch of 64 completions in one pass held ~7 GB of
them. `micro_batch_rows` sizes a pass so that its activations and its logits stay near
ACTIVATION_BUDGET; the update adds the passes' gradients up, weighted by tokens, to the
minibatch's gradient (lm/ppo.py).

The budget aims at 4 GB on SmolLM2-135M with every weight training: policy, reference, gradients
and AdamW's moments take 2.7 GB, the libraries ~0.3 GB, and glibc's heap keeps more of what the
passes free the larger they are. RL iterations at the sentiment preset's batch with VADER as the
reward (VmHWM, 3 iterations, this 2-core machine) peaked at 4,404 MiB with passes of 5 rows (512
MiB), 4,166 MiB with 5 rows and `release_freed_memory` before each pass, 3,697 MiB with 2 rows
(256 MiB) and it, and 3,252 MiB (3.41 GB) once the reference was held only while used
(`ReloadedReference`); the whole sentiment pipeline, whose RL stage also holds the 10-block
reward model, peaked at 4.18 GB before that change and 3.72 GB after it (docs/lm_real_model.md). Larger passes run faster (123 GFLOP/s at
16 rows against 89 at 2, measured here): a machine with room to spare can ask for more with
--ppo.micro-batch-size. Passes without gradients (`inference_rows`) save nothing for a backward
pass, so the same budget takes ~6x the rows: the rollout's reference and reward-model passes at
12 rows took 10.5 s of an iteration where 2-row passes (with the policy's) took 27 s.

`reset_peak` / `peak_gb` measure a stage's own peak resident memory: Linux resets the peak
(VmHWM) when "5" is written to /proc/self/clear_refs; elsewhere the peak is the process's since
it started (ru_maxrss), which is an upper bound on each stage's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from functools import cache
from pathlib import Path

from torch import nn

ACTIVATION_BUDGET = 256 * 2**20  # bytes of saved activations and logits one training pass may hold
FLOATS_PER_HIDDEN = 16  # floats a block saves per token per unit of width (fitted to SmolLM2's 1 MB / token)
LOGIT_COPIES = 3  # logits, their log-softmax, and its gradient: floats per kept position per vocabulary entry
FLOAT_BYTES = 4

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def pass_bytes(config, tokens: int, kept: int, training: bool = True) -> int:
    """Bytes a pass over `tokens` tokens of the model `config` describes (a Hugging Face config)
    holds: the logits of `kept` positions, and every block's saved activations in a training
    pass, or one block's working set in a pass without gradients."""
    blocks = config.num_hidden_layers if training else 1
    return FLOAT_BYTES * (tokens * blocks * FLOATS_PER_HIDDEN * config.hidden_size
                          + kept * config.vocab_size * LOGIT_COPIES)


def micro_batch_rows(model: nn.Module, rows: int, width: int, kept: int, requested: int = 0,
                     prompt_width: int = 0, group: int = 1) -> int:
    """Rows per forward/backward pass over a minibatch of `rows` rows of `width` tokens, `kept`
    of whose final positions' logits are read: `requested` when > 0, else as many as
    ACTIVATION_BUDGET allows (at least one, at most `rows`). With `group` > 1 the rows come in
    blocks of `group` that share their first `prompt_width` tokens, read once a pass
    (`completions_forward`): a pass takes a whole number of blocks, or a divisor of one, so that
    no pass straddles two blocks."""
    if requested > 0:
        return min(requested, rows)

    def bytes_of(pass_rows: int) -> int:
        prompts = pass_rows if group == 1 else max(1, pass_rows // group)  # prompts read in the pass
        tokens = pass_rows * (width - prompt_width) + prompts * prompt_width
        return pass_bytes(model.config, tokens, pass_rows * kept)

    return max([1] + [r for r in range(1, rows + 1) if whole_groups(r, group) and bytes_of(r) <= ACTIVATION_BUDGET])


def whole_groups(pass_rows: int, group: int) -> bool:
    """Whether passes of `pass_rows` rows over blocks of `group` rows (cut from a block's start)
    never straddle two blocks: a whole number of blocks, or a divisor of one."""
    return group % pass_rows == 0 or pass_rows % group == 0


def inference_rows(model: nn.Module, rows: int, width: int, kept: int, group: int = 1) -> int:
    """Rows per forward pass without gradients (the reference's log-probs, the reward model's
    scores, evaluations) of a model shaped like `model`: as many as ACTIVATION_BUDGET allows when
    nothing is saved for a backward pass (every row's prompt counted), taken so that no pass
    straddles two blocks of `group` rows (`whole_groups`), whose prompt it then reads once. Larger
    passes run faster on a CPU (SmolLM2-135M: 12 rows of ~77 tokens a pass here, where a training
    pass takes 2)."""
    fits = max(1, min(rows, ACTIVATION_BUDGET // pass_bytes(model.config, width, kept, training=False)))
    return max(r for r in range(1, fits + 1) if whole_groups(r, group))


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages the heap holds free back to the OS (glibc's malloc_trim; a few ms), so a
    pass starts from what is live rather than from the last pass's high-water mark."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start a new peak at the current resident size; False where the OS offers no reset."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_gb() -> float:
    """Peak resident memory in GB (10^9 bytes) since the last `reset_peak`, or since the process
    started where the OS offers no reset."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return round(hwm * 1024 / 1e9, 2)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)
