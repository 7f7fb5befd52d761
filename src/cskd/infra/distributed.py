"""Process-group set-up for torchrun, and the small collectives training needs.

The single-process CPU path is the default; under ``torchrun`` the environment variables RANK,
LOCAL_RANK and WORLD_SIZE select the rank, and nothing else in training changes. The global rank
decides who writes (rank 0); the local rank picks the GPU on its node.

A failing rank must stop the job, never leave the others waiting. Three things see to it:
collectives time out after ``train.dist_timeout_s``; set-up steps that can fail on one node only
(a missing file) run through :func:`together`, so every rank raises at once; and per-step
decisions (stop now, the loss is not finite) are agreed by all ranks (:func:`any_rank`). Anything
else that kills one rank kills its process, and torchrun then stops the others.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedError

Result = TypeVar("Result")


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0  # global rank: decides who writes logs and checkpoints
    local_rank: int = 0  # rank on this node: decides the GPU
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """``auto`` and ``cuda`` mean the GPU of this process's local rank; ``cpu``, ``cuda:N`` stay."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no GPU is visible: use train.device=cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:") and local_world_size > 1:
        raise ConfigError(
            f"train.device={name} puts all {local_world_size} processes of this node on one GPU: "
            "use train.device=cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    return torch.device(name)


def init_distributed(*, device: str, backend: str, timeout_s: int) -> DistributedInfo:
    """Join the process group torchrun describes, or return the single-process description.

    ``backend="auto"`` is NCCL on GPUs and Gloo on the CPU; ``timeout_s`` bounds every collective,
    so a rank that died or hangs makes the others fail instead of waiting for ever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    resolved = resolve_device(device, local_rank, local_world_size)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if resolved.type == "cuda" else "gloo"
        if backend == "nccl" and resolved.type != "cuda":
            raise ConfigError("train.dist_backend=nccl needs GPUs: use gloo (or auto) on the CPU")
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=resolved if backend == "nccl" else None,
        )
    return DistributedInfo(rank, local_rank, world_size, resolved)


def shutdown() -> None:
    """Leave the process group after a successful run (after a failure the process just exits)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where small collective tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a collective: every rank must call it)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def failed_ranks(failed: bool) -> list[int]:
    """The ranks on which ``failed`` is true (a collective; ``[]`` or ``[0]`` in one process)."""
    if not dist.is_initialized():
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(), device=_collective_device())
    flags[dist.get_rank()] = float(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return [rank for rank, value in enumerate(flags.tolist()) if value]


def together(function: Callable[..., Result], /, *args, **kwargs) -> Result:
    """Run ``function`` on every rank; if it raises on any rank, raise on all of them.

    The failing rank re-raises its own error; the others raise :class:`DistributedError` naming
    it. Use it for set-up that can fail on one node only (data or a checkpoint missing there), so
    that the job stops at once instead of the other ranks waiting in their next collective.
    """
    error: Exception | None = None
    result = None
    try:
        result = function(*args, **kwargs)
    except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = caught
    failed = failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        ranks = ", ".join(map(str, failed))
        raise DistributedError(
            f"rank {ranks} failed in {function.__name__} (its own error is printed above): "
            "stopping this rank too"
        )
    return result


def gather_objects(value: Any) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank (a collective: every rank
    must call it); ``[value]`` in a single process."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same(value: int, *, what: str, fix: str) -> None:
    """Raise :class:`DistributedError` on every rank unless ``value`` is equal on all of them."""
    if not dist.is_initialized():
        return
    bounds = torch.tensor([value, -value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    high, low = int(bounds[0]), -int(bounds[1])
    if high != low:
        raise DistributedError(f"the ranks disagree on {what} (from {low} to {high}): {fix}")


class RankFilter(logging.Filter):
    """Lets records through on the main rank only (or every record with ``all_ranks=True``)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or getattr(record, "all_ranks", False)
