"""One process or K: the distributed context every trainer receives (`DistContext`).

  torchrun --nproc-per-node K -m proximal train ENV_ID ...      control PPO, K processes
  torchrun --nproc-per-node K -m proximal rlhf TASK ...         the LM pipeline, K processes
  torchrun --nnodes M --node-rank I --master-addr HOST --master-port PORT --nproc-per-node K ...

`join` reads torchrun's environment once (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
picks the backend (gloo on CPU, NCCL on CUDA), the device from the local rank, and returns the
context. Without torchrun it returns `DistContext()`: one process, whose operations are the
identity (a sum over one rank is the value itself) and cost nothing, so a trainer reads as if it
ran alone: `dist.average_gradients(...)` after `backward()`, `dist.is_main` before writing.

The trainers stay one algorithm on K processes:
  - parameters start identical (the same seed) and stay so: each step's gradient is the
    all-reduced, weight-averaged mean of the ranks' gradients, sum_r w_r g_r / sum_r w_r, with w_r
    the rows (or tokens) the rank's loss averaged over, so it equals the gradient of the mean
    over the global batch; the loss's finiteness is voted in the same all-reduce;
  - statistics over the global batch: `moments` (per-minibatch mean and std), `masked_moments`
    (LM advantage whitening), `mean_of` (logged values, the KL fed to the adaptive controller);
  - rank 0 alone writes, evaluates and labels; the others wait for it (`wait_for_main`, without
    the join timeout, since a person labelling may take an hour).
We average by hand rather than wrap the model in DistributedDataParallel: the weights w_r
(tokens per rank vary), the finiteness vote, and LoRA policies whose reference is the same module
with adapters disabled all fit one flat all-reduce per step, and the model stays a plain module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from proximal.errors import ConfigError, ProximalError
from proximal.losses import masked_moments

RANK_SEED_STRIDE = 1_000_003  # rank r's own random streams start at seed + r * stride
WAIT_FOR_MAIN = timedelta(days=7)  # how long the other ranks wait while rank 0 works alone
Result = TypeVar("Result")


class DistributedError(ProximalError):
    """The ranks could not start or keep running together."""


@dataclass(frozen=True)
class DistContext:
    """Which process this is of how many, and the collectives the trainers need."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # this process's device: cuda:LOCAL_RANK on a GPU machine
    backend: str | None = None  # "gloo" or "nccl"; None for one process
    wait_group: Any = field(default=None, repr=False, compare=False)  # a gloo group without the join timeout

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, evaluates and labels (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- numbers over the ranks -------------------------------------------------------------------

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks of `values`, as a new float64 tensor."""
        total = values.detach().to(torch.float64).clone()
        if self.distributed:
            total = total.to(self.device)
            torch_dist.all_reduce(total)
            total = total.cpu()
        return total

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a scalar (each rank's weight equal)."""
        return value if not self.distributed else (self.sum(value) / self.world_size).to(value.dtype)

    def weighted_mean(self, value: torch.Tensor, weight: float) -> float:
        """The mean over the ranks of a scalar that is itself a mean over `weight` rows or tokens
        (a loss): sum_r w_r v_r / sum_r w_r; in one process the value itself."""
        if not self.distributed:
            return value.item()
        total, weights = self.sum(torch.stack([value.detach().double().cpu() * weight, torch.tensor(float(weight))]))
        return float(total / weights)

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (for logging and decisions all ranks share).
        None values stay None."""
        keys = sorted(key for key, value in values.items() if value is not None)
        if not self.distributed or not keys:
            return dict(values)
        means = self.sum(torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)) / self.world_size
        return {**values, **dict(zip(keys, means.tolist()))}

    def moments(self, values: torch.Tensor, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std [P] of each part p of `values` (`parts`: P index tensors on every
        rank) over the union of every rank's part p, in one all-reduce."""
        if not self.distributed:
            return (torch.stack([values[index].mean() for index in parts]),
                    torch.stack([values[index].std() for index in parts]))
        local = torch.stack([torch.stack([torch.tensor(float(len(index)), dtype=torch.float64),
                                          values[index].double().sum(), values[index].double().pow(2).sum()])
                             for index in parts])  # [P, 3]
        count, total, squares = self.sum(local).unbind(-1)
        mean = total / count
        variance = (squares - count * mean ** 2) / (count - 1).clamp_min(1)
        return mean.to(values.dtype), variance.clamp_min(0).sqrt().to(values.dtype)

    def masked_moments(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of `values` where `mask` is True, over every rank's entries
        (`losses.masked_moments` of the global batch; two all-reduces: the mean, then the squares)."""
        if not self.distributed:
            return masked_moments(values, mask)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        count, total = self.sum(torch.stack([mask.sum().double(), torch.where(mask, values, zero).double().sum()]))
        mean = total / count.clamp_min(1)
        squares = self.sum(torch.where(mask, values.double() - mean.to(values.device), zero.double()).pow(2).sum())
        return mean.to(values), (squares / count.clamp_min(1)).to(values)

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows [n, ...] (equal n on every rank), concatenated in rank order [K n, ...]."""
        if not self.distributed:
            return rows
        local = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)).to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(gathered, local)
        return torch.cat(gathered).cpu().numpy()

    # -- gradients and parameters ----------------------------------------------------------------

    def average_gradients(self, parameters: list[torch.nn.Parameter], weight: float, loss: torch.Tensor) -> bool:
        """Replace each rank's gradients (of a mean over `weight` rows or tokens) by the weighted
        mean over all ranks, sum_r w_r g_r / sum_r w_r, in one all-reduce; a parameter without a
        gradient (a rank with no rows) counts as zero. Returns whether the loss was finite on
        every rank, so that all ranks stop together if not."""
        if not self.distributed:
            return bool(torch.isfinite(loss))
        grads = []
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        finite = float(torch.isfinite(loss)) if weight else 1.0  # a rank without rows has nothing to vote
        flat = torch.cat([torch.cat([grad.reshape(-1).float() for grad in grads]) * weight,
                          torch.tensor([float(weight), finite], device=grads[0].device)])
        torch_dist.all_reduce(flat)
        total_weight, finite_ranks = float(flat[-2]), float(flat[-1])
        flat = flat[:-2] / max(total_weight, 1e-12)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return finite_ranks == self.world_size

    # -- rows, random streams and objects --------------------------------------------------------

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global minibatch's row `index` [b] (sizes differ by at
        most one when K does not divide b)."""
        return index if not self.distributed else torch.tensor_split(index, self.world_size)[self.rank]

    def rank_generator(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """The random stream for what each rank draws on its own (its samples, its minibatches):
        `generator` itself in one process (so one process's numbers do not change), else a new
        one seeded `seed + rank * RANK_SEED_STRIDE`."""
        if not self.distributed:
            return generator
        return torch.Generator(device=generator.device).manual_seed(seed + RANK_SEED_STRIDE * self.rank)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def on_main(self, work: Callable[[], Result]) -> Result:
        """`work()` on rank 0 alone (labelling, evaluating, writing) while the others wait, however
        long; every rank returns rank 0's result. An error on rank 0 stops the others too, each
        with one line."""
        if not self.distributed:
            return work()
        if self.is_main:
            try:
                result = work()
            except BaseException as error:
                self.wait_for_main(("error", str(error).strip().splitlines()[0] if str(error).strip()
                                    else type(error).__name__))
                raise
            self.wait_for_main(("done", result))
            return result
        kind, value = self.wait_for_main()
        if kind == "error":
            raise DistributedError(f"rank {self.rank} of {self.world_size}: rank 0 stopped ({value})")
        return value

    def wait_for_main(self, outcome: Any = None) -> Any:
        """Every rank waits here until rank 0 arrives, however long it works alone (labelling,
        evaluating, writing); returns rank 0's `outcome` (for example, the error it met, so the
        others stop too)."""
        if not self.distributed:
            return outcome
        box = [outcome]
        torch_dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]


def launched_world_size() -> int:
    """The world size torchrun (or a user's environment) asks for; 1 when not launched that way."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def join(timeout_seconds: float, device: str = "cpu", command: str = "train") -> DistContext:
    """The context torchrun's environment describes, the process group joined; `DistContext()`
    when WORLD_SIZE is 1 or unset. `device` "cuda" gives NCCL and cuda:LOCAL_RANK, else gloo. A
    rank that cannot reach the others within `timeout_seconds` fails with one line instead of
    waiting forever."""
    world_size = launched_world_size()
    if world_size <= 1:
        return DistContext(device=device)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with "
                          f"torchrun --nproc-per-node K -m proximal {command} ...")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not torch_dist.is_initialized():
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        saved_stderr = os.dup(2)  # c10d's C++ side writes its retries and stack frames to fd 2
        silent = os.open(os.devnull, os.O_WRONLY)
        os.dup2(silent, 2)
        try:
            torch_dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
        except Exception as error:  # torch raises DistStoreError, RuntimeError, ValueError ...
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise DistributedError(f"rank {rank} of {world_size}: could not join the others at {address} "
                                   f"within {timeout_seconds:g} s ({reason})") from None
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            os.close(silent)
    wait_group = torch_dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
    return DistContext(rank, local_rank, world_size, device, backend, wait_group)


def leave() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
