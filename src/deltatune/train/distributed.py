"""Data parallelism under ``torchrun``: process group set-up and batch slicing.

Each optimizer step consumes the same *global* batch whatever the number of processes; rank
``r`` of ``w`` takes rows ``r, r + w, …`` of it. Losses are normalised by the global target
count, so N processes compute the same update as one (up to float summation order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deltatune.utils.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Process group (NCCL with GPUs, gloo on CPU) and this process's device (``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes (a no-op for one); the result is on the CPU."""
    if info.enabled:
        value = value.to(info.device).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.cpu()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def slice_batch(batch: dict, info: DistInfo) -> dict:
    """This rank's rows of a collated global batch."""
    if not info.enabled:
        return batch
    rows = batch["input_ids"].shape[0]
    if rows < info.world:
        raise ConfigError(f"train.batch_size ({rows}) must be at least the number of processes ({info.world})")
    out = {}
    for key, value in batch.items():
        out[key] = value[info.rank :: info.world] if isinstance(value, torch.Tensor) else value[info.rank :: info.world]
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
