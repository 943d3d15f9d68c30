"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables);
without them everything here is a single-process no-op.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "cleanup",
]


class DistInfo(NamedTuple):
    """What :func:`init_distributed` found: unpacks as ``rank, world_size, local_rank, device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Uses NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available, else
    gloo on CPU. Without ``RANK``/``WORLD_SIZE`` in the environment this is a no-op returning
    ``(0, 1, 0, cuda:0 or cpu)``.
    """
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") or 0
    cuda = torch.cuda.is_available()
    if rank is None or world_size is None:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, or when not distributed: the process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over all ranks, as a new tensor (a detached copy when not distributed)."""
    out = t.detach().clone()
    if not is_distributed() or get_world_size() == 1:
        return out
    if not out.is_floating_point():
        out = out.to(torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out /= get_world_size()
    return out


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_distributed():
        dist.destroy_process_group()
