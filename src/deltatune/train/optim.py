"""Optimizer and learning-rate schedule from the recipe."""
from __future__ import annotations

import math

import torch

from deltatune.train.config import OptimConfig, ScheduleConfig


def build_optimizer(params: list[torch.nn.Parameter], config: OptimConfig, model: torch.nn.Module | None = None, objective=None) -> torch.optim.Optimizer:
    """AdamW over ``params``; fused kernels where this torch build has them, else foreach.

    Any other ``config.name`` is one of :mod:`deltatune.optim` (GaLore, LISA, LOMO, MeZO …), which
    may need the model (LISA's layers, GaLore's embeddings) or the objective (MeZO's losses).
    """
    if config.name != "adamw":
        from deltatune import optim

        return optim.build(params, config, model, objective)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norm scales are not decayed
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


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
