"""AdamW (Loshchilov & Hutter, 2019), the default optimizer, registered like the memory-efficient ones.

Per trainable tensor θ with gradient g, at step t (decoupled weight decay λ)::

    m ← β₁ m + (1 − β₁) g          v ← β₂ v + (1 − β₂) g²
    θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) − lr · λ · θ

Matrices are decayed; 1-D tensors (biases, norm scales) are not. Fused kernels where this torch
build has them (one launch per step, no full-size temporaries), else the foreach path.
"""
from __future__ import annotations

import torch

from deltatune.optim import register_optimizer


@register_optimizer("adamw")
def build_adamw(params, config, model, objective) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these tensors' device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
