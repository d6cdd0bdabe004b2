"""Optimizer and learning-rate schedule from the recipe."""
from __future__ import annotations

import math

import torch

from deltatune import optim
from deltatune.train.config import OptimConfig, ScheduleConfig


def build_optimizer(params: list[torch.nn.Parameter], config: OptimConfig, model: torch.nn.Module | None = None, objective=None) -> torch.optim.Optimizer:
    """The registered optimizer ``config.name`` (:mod:`deltatune.optim`: AdamW, GaLore, LISA, LOMO,
    MeZO …) over ``params``; some need the model (LISA's layers, GaLore's embeddings) or the
    objective (MeZO's losses)."""
    return optim.build(params, config, model, objective)


def lr_factor(step: int, total: int, config: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): warm-up, then decay.

    linear: 1 → min_lr_ratio; cosine: half cosine from 1 to min_lr_ratio; constant: 1.
    """
    warmup = config.warmup_steps or int(config.warmup_ratio * total)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.min_lr_ratio
    if config.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
