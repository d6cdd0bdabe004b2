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

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


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
