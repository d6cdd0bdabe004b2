"""Grafting / skill localisation (Panigrahi et al., 2023): keep a fine-tuned model's skill in a
sparse set of its weight changes.

Given a base θ₀ and a fine-tuned θ_ft of the same architecture, per target matrix keep the
``k = ⌊density·out·in⌋`` entries of largest |Δθ| = |θ_ft − θ₀| and graft them onto the base::

    θ_graft = θ₀ + mask ⊙ Δθ

The graft is an ordinary sparse delta (method ``lt_sft``: indices + values), so it saves, loads,
merges and composes like any other. :func:`graft_curve` reports a metric of the graft against
density (accuracy kept vs density).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deltatune.core.delta_model import DeltaModel
from deltatune.core.inject import iter_wrappers
from deltatune.algebra.sparse import top_k_indices
from deltatune.utils.errors import ConfigError, ShapeMismatchError


def graft(base: nn.Module, finetuned: nn.Module, density: float, targets: str | list[str] = "all-linear", name: str = "graft") -> DeltaModel:
    """Attach to ``base`` the sparse delta top-``density`` of |θ_ft − θ₀| per target matrix (see module doc)."""
    if not 0 < density <= 1:
        raise ConfigError(f"graft: density must be in (0, 1], got {density}")
    ft = dict(finetuned.named_parameters())
    model = DeltaModel.of(base)
    model.attach({"method": "lt_sft", "density": density, "targets": targets}, name=name)
    try:
        with torch.no_grad():
            for module_name, wrapper in iter_wrappers(model.base_model):
                if name not in wrapper.deltas:
                    continue
                key = module_name + ".weight"
                w0 = wrapper.base_layer.weight
                if key not in ft:
                    raise ShapeMismatchError(f"graft: the fine-tuned model has no parameter {key!r}; is it the same architecture as the base?")
                if ft[key].shape != w0.shape:
                    raise ShapeMismatchError(f"graft: {key!r} is {list(ft[key].shape)} in the fine-tuned model but {list(w0.shape)} in the base")
                diff = (ft[key].detach().to(w0.device, torch.float32) - w0.float()).reshape(-1)
                branch = wrapper.deltas[name]
                branch.set_support(top_k_indices(diff.abs(), branch.sparse_values.numel()))
                branch.sparse_values.copy_(diff[branch.sparse_indices.long()].to(branch.sparse_values.dtype))
    except BaseException:
        model.detach(name)
        raise
    return model


def graft_curve(base_factory: Callable[[], nn.Module], finetuned: nn.Module, densities: list[float], metric: Callable[[nn.Module], float],
                targets: str | list[str] = "all-linear") -> list[dict[str, float]]:
    """``[{"density": d, "metric": metric(graft(base, ft, d)), "kept": metric / metric(ft)}]`` for each density."""
    full = metric(finetuned)
    rows = []
    for d in densities:
        value = metric(graft(base_factory(), finetuned, d, targets))
        rows.append({"density": d, "metric": value, "kept": value / full if full else float("nan")})
    return rows
