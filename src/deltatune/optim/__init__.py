"""Memory-efficient full fine-tuning optimizers, selected by ``optim.name`` in a recipe.

============  =====================================================================  ==========================
name          what it keeps                                                          module
============  =====================================================================  ==========================
adamw         two moments per trainable entry (3× the weights with the gradient)    :mod:`.adamw`
galore        Adam moments in a rank-r gradient subspace per 2-D matrix              :mod:`.galore`
lisa          AdamW state only for embeddings, head and γ sampled middle layers      :mod:`.lisa`
lomo          nothing: SGD fused into backward, gradients freed as they appear      :mod:`.lomo`
adalomo       factored second moments (rows + columns), fused into backward          :mod:`.lomo`
mezo          nothing: forward-only SPSA, perturbation regenerated from a seed       :mod:`.mezo`
sparse_mezo   MeZO perturbing only the smallest-magnitude share of each tensor       :mod:`.mezo`
============  =====================================================================  ==========================

An optimizer whose ``owns_step`` is true runs the forward/backward passes of a step itself
(``train_step(micro_batches, step_loss)``), because its update cannot be split into "backward,
then ``step()``": LOMO applies updates inside backward, MeZO never calls backward. The training
loop asks only for that attribute, never for a name.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deltatune.utils.errors import ConfigError

# name → builder(params, optim config, model, objective) → torch.optim.Optimizer
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {}


def register_optimizer(name: str):
    def deco(fn):
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} registered twice")
        OPTIMIZERS[name] = fn
        return fn
    return deco


def build(params: list[torch.nn.Parameter], config: Any, model: torch.nn.Module | None = None, objective: Any = None) -> torch.optim.Optimizer:
    """The optimizer ``config.name`` over ``params``; settings that cannot fit the model fail here, before any step."""
    from deltatune.optim import adamw, galore, lisa, lomo, mezo  # noqa: F401  (register)

    if config.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {config.name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[config.name](params, config, model, objective)


def named_parameters_of(model: torch.nn.Module | None, params: list[torch.nn.Parameter]) -> dict[int, str]:
    """id(param) → its name in ``model`` (for error messages and per-parameter choices)."""
    if model is None:
        return {id(p): f"param{i}" for i, p in enumerate(params)}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {id(p): names.get(id(p), f"param{i}") for i, p in enumerate(params)}
