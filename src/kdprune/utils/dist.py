"""Distributed (torchrun) helpers: rank info, process-group set-up, reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read rank/world size from the initialised process group or torchrun's env vars."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed)."""
    return dist_info().is_main


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Initialise the process group under torchrun (NCCL on CUDA, gloo on CPU); no-op otherwise."""
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        use_cuda = device is not None and device.type == "cuda"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
    return dist_info()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Synchronise ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
