"""Data-parallel PPO on torch.distributed: K processes (ranks) stepping their share of the envs,
running one algorithm.

  torchrun --nproc-per-node K -m proximal train ENV_ID ...          one machine, K processes
  torchrun --nnodes M --node-rank I --master-addr HOST --master-port PORT --nproc-per-node K \
           -m proximal train ENV_ID ...                               M machines (run on each)

The config describes the whole run: `--num-envs N` is the total, split evenly over the ranks; rank
r steps envs r N/K .. (r + 1) N/K - 1 of an N-env run, seeded as those envs would be. K ranks
therefore run the algorithm of one process with N envs (the tests check one update against it):
  - parameters start identical (the same seed) and stay so: each minibatch's gradient is the
    all-reduced, size-weighted mean of the ranks' gradients (`average_gradients`), so every rank
    takes the same optimiser step; the global loss's finiteness is decided in the same call;
  - minibatches: the same number on every rank, from the global batch size; each rank's
    minibatch is its share of a global one;
  - advantage normalisation: each minibatch's mean and std over all ranks' rows (`moments`, one
    all-reduce per epoch for all its minibatches);
  - observation and reward statistics: every step's rows of all ranks folded in, in rank order
    (`gather_rows`), so each rank's running statistics equal the one-process ones;
  - target-KL early stopping and --stop-return: decided on global values, the same on every rank;
  - logging: episode returns of all ranks; rank 0 alone writes the run directory and evaluates.
The gloo backend carries the collectives on CPU (nccl is for tensors on GPUs; PPO's small MLPs
train on CPUs here). Each action is still sampled by its own rank's torch generator (seeded by rank).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from proximal.errors import ConfigError, ProximalError


class DistributedError(ProximalError):
    """The ranks could not start or keep running together."""


class Collective:
    """The collectives PPO needs, over the default process group (world size K >= 2)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks of a float64 tensor (a new tensor)."""
        total = values.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        return total

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows [n, ...] (equal n on every rank), concatenated in rank order [K n, ...]."""
        local = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return torch.cat(gathered).numpy()

    def gather_objects(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def moments(self, values: torch.Tensor, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std [P] of each part p of `values`, over the union of every rank's
        part p (`parts`: index tensors, P of them on every rank), in one all-reduce."""
        local = torch.stack([torch.stack([torch.tensor(float(len(index)), dtype=torch.float64),
                                          values[index].double().sum(), values[index].double().pow(2).sum()])
                             for index in parts])  # [P, 3]
        count, total, squares = self.sum(local).unbind(-1)
        mean = total / count
        variance = (squares - count * mean ** 2) / (count - 1).clamp_min(1)
        return mean.to(values.dtype), variance.clamp_min(0).sqrt().to(values.dtype)

    def average_gradients(self, parameters: list[torch.nn.Parameter], local_rows: int, loss: torch.Tensor) -> bool:
        """Replace each rank's gradients (of a mean over its `local_rows` rows) by the mean over all
        ranks' rows: sum_r n_r g_r / sum_r n_r, one all-reduce. Returns whether the loss was finite
        on every rank (so all ranks stop together if not)."""
        grads = [parameter.grad for parameter in parameters]
        flat = torch.cat([grad.reshape(-1) for grad in grads]) * local_rows
        flat = torch.cat([flat, torch.tensor([float(local_rows), float(torch.isfinite(loss))])])
        dist.all_reduce(flat)
        total_rows, finite_ranks = float(flat[-2]), float(flat[-1])
        flat = flat[:-2] / total_rows
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return finite_ranks == self.world_size

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (for logging)."""
        keys = sorted(values)
        means = self.sum(torch.tensor([values[key] for key in keys], dtype=torch.float64)) / self.world_size
        return dict(zip(keys, means.tolist()))


def launched_world_size() -> int:
    """The world size torchrun (or a user's environment) asks for; 1 when not launched that way."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def join(timeout_seconds: float) -> Collective | None:
    """Join the process group torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); None when WORLD_SIZE is 1 or unset. A rank that cannot reach the others within
    `timeout_seconds` fails with one line instead of waiting forever."""
    world_size = launched_world_size()
    if world_size <= 1:
        return None
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with "
                          "torchrun --nproc-per-node K -m proximal train ...")
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        saved_stderr = os.dup(2)  # c10d's C++ side writes its retries and stack frames to fd 2
        silent = os.open(os.devnull, os.O_WRONLY)
        os.dup2(silent, 2)
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_seconds))
        except Exception as error:  # torch raises DistStoreError, RuntimeError, ValueError ...
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise DistributedError(f"rank {rank} of {world_size}: could not join the others at {address} "
                                   f"within {timeout_seconds:g} s ({reason})") from None
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            os.close(silent)
    return Collective(rank, world_size)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
