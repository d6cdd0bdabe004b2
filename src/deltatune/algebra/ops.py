"""Merge ops: pure tensor functions ``(base, [task vectors], params) → merged task vector``.

Every op sees one tensor name at a time: ``base`` [*shape] is the base weight (``None`` when the
inputs are adapters merged without a base), ``tasks`` is a list of K task vectors τ_k = θ_k − θ_base
of the same shape, and :class:`OpParams` carries the per-input weights w_k / densities d_k and the
method's options. The engine adds the result to the base (θ = θ_base + op(...)), so the same op
merges full checkpoints, adapters turned into ΔW, or sparse deltas.

The generalized task arithmetic below is TIES, DARE and task arithmetic as options of one op (as in
mergekit), in plain PyTorch::

    τ'_k = sparsify(τ_k, d_k)                      # magnitude: keep top ⌈…⌉ |τ|; random: Bernoulli(d_k) / d_k
    u_k  = w_k · τ'_k
    m_k  = [sign(u_k) == sign(Σ_j u_j)]             # consensus "sum" (TIES), else m_k = 1
    τ    = λ · Σ_k m_k u_k / (Σ_k m_k w_k  if normalize else 1)

Model-level ops (whole models at once: greedy soup, optimal-transport fusion in ``ot_fusion.py``)
register with :func:`register_model_op` instead; the engine hands them the validated recipe.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from deltatune.utils.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class OpParams:
    """Options of one merge, already validated by the recipe (see :mod:`deltatune.algebra.recipe`)."""

    weights: tuple[float, ...]
    densities: tuple[float, ...] | None = None      # per input, in (0, 1]; None = keep all
    sparsify: Literal["magnitude", "random"] | None = None
    consensus: Literal["sum", "count"] | None = None
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True                              # random drop: divide the kept entries by d_k (DARE)
    seed: int = 0
    name: str = ""                                    # the tensor's name, for ops that need it (and errors)
    generator: torch.Generator | None = field(default=None, compare=False)


MergeOp = Callable[[torch.Tensor | None, list[torch.Tensor], OpParams], torch.Tensor]


@dataclass(frozen=True)
class OpSpec:
    fn: MergeOp
    defaults: dict                 # recipe parameter defaults of this method
    needs_base: bool = True        # False: the op averages whole models (a soup); θ_base only as a reference


@dataclass(frozen=True)
class ModelOpSpec:
    fn: Callable                   # fn(recipe, log) -> report dict; writes recipe.output itself
    needs_eval: bool = False       # scores candidate models on the recipe's eval section (greedy soup)
    weighted: bool = True          # uses the inputs' weights, so their sum must not vanish


OPS: dict[str, OpSpec] = {}
# Model-level ops (OT fusion, greedy soup): they need whole models, not one tensor at a time.
MODEL_OPS: dict[str, ModelOpSpec] = {}


def register_op(name: str, fn: MergeOp, needs_base: bool = True, **defaults) -> None:
    if name in OPS or name in MODEL_OPS:
        raise ValueError(f"merge op {name!r} registered twice")
    OPS[name] = OpSpec(fn, defaults, needs_base)


def register_model_op(name: str, fn: Callable, needs_eval: bool = False, weighted: bool = True) -> None:
    """Register an op that needs whole models (e.g. ``ot_fusion``): ``fn(recipe, log) -> dict`` (a report)."""
    if name in OPS or name in MODEL_OPS:
        raise ValueError(f"merge op {name!r} registered twice")
    MODEL_OPS[name] = ModelOpSpec(fn, needs_eval, weighted)


def list_ops() -> list[str]:
    return sorted([*OPS, *MODEL_OPS])


def get_op(name: str) -> OpSpec:
    if name not in OPS:
        raise ConfigError(f"unknown merge method {name!r}{did_you_mean(name, list_ops())}; available: {', '.join(list_ops())}")
    return OPS[name]


# --- sparsification -------------------------------------------------------------------------------

def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density · numel)`` entries of largest |tensor| (at least one).

    Plain equivalent: ``m = zeros(n); m[argsort(|t|, descending)[:k]] = 1``. Selecting the k-th
    largest magnitude (``kthvalue``, linear time) and keeping what is at least as large picks the
    same set unless magnitudes tie at the threshold; only then is the full argsort run, so that ties
    are broken exactly as mergekit breaks them.
    """
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    n = tensor.numel()
    k = max(1, int(density * n))
    magnitude = tensor.abs().reshape(-1).float()
    threshold = magnitude.kthvalue(n - k + 1).values
    mask = magnitude >= threshold
    if int(mask.sum()) != k:
        mask = torch.zeros(n, dtype=torch.bool, device=tensor.device)
        mask[torch.argsort(magnitude, descending=True)[:k]] = True
    return mask.view_as(tensor)


def sparsify(tensor: torch.Tensor, density: float, method: str, rescale: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """``magnitude``: keep the top-``density`` share of |τ| (TIES trim). ``random``: keep each entry with
    probability ``density`` and divide the survivors by ``density`` (DARE), so E[τ'] = τ."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        return tensor * magnitude_mask(tensor, density)
    keep = torch.rand(tensor.shape, generator=generator, device=tensor.device) < density
    out = tensor * keep
    return out / density if rescale else out


def consensus_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES sign election over stacked weighted task vectors [K, *shape] → bool mask [K, *shape].

    ``sum``: the elected sign is sign(Σ_k u_k) (ties → +); ``count``: the sign most inputs have.
    Zero entries never agree (their sign is 0), which makes the mean below disjoint.
    """
    sign = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    elected = (total >= 0).to(sign.dtype) * 2 - 1
    return sign == elected


def generalized_task_arithmetic(base: torch.Tensor | None, tasks: list[torch.Tensor], p: OpParams) -> torch.Tensor:
    """The op behind ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties`` (see the module docstring).

    Same arithmetic as stacking the K task vectors into [K, *shape] and reducing over dim 0, but
    accumulated input by input, so the working set is the K inputs plus three tensors of one shape.
    """
    densities = p.densities or (1.0,) * len(tasks)
    weighted = []
    for task, w, d in zip(tasks, p.weights, densities):
        t = task.float()
        if p.sparsify is not None:
            t = sparsify(t, d, p.sparsify, p.rescale, p.generator)
        weighted.append(t * w if t is task else t.mul_(w))  # never write into the caller's tensors
    if p.consensus is not None:
        if p.consensus == "sum":
            total = _ordered_sum(weighted)
        else:
            total = _ordered_sum([u.sign() for u in weighted])
        elected = (total >= 0).to(total.dtype).mul_(2).sub_(1)
        del total
        mixed = torch.zeros_like(elected)
        divisor = torch.zeros_like(elected)
        for u, w in zip(weighted, p.weights):
            agree = u.sign() == elected
            mixed.add_(u * agree)
            divisor.add_(agree * w)
        divisor[divisor == 0] = 1
    else:
        mixed = _ordered_sum(weighted)
        divisor = torch.tensor(p.weights, dtype=torch.float32).sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones(())
    del weighted
    if p.normalize:
        mixed = mixed.div_(divisor)
    return mixed.mul_(p.lambda_) if p.lambda_ != 1 else mixed


def _ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """t_0 + t_1 + … in order (the order ``stack(...).sum(0)`` adds in, so results match bit for bit)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


register_op("task_arithmetic", generalized_task_arithmetic, normalize=False)
register_op("ties", generalized_task_arithmetic, sparsify="magnitude", consensus="sum", normalize=True, density=0.2)
register_op("dare_linear", generalized_task_arithmetic, sparsify="random", normalize=False, density=0.5)
register_op("dare_ties", generalized_task_arithmetic, sparsify="random", consensus="sum", normalize=False, density=0.5)
# A (weighted) average of whole models: θ = Σ w_k θ_k / Σ w_k, written as θ_ref + that average of the
# θ_k − θ_ref, so it needs no true base (the first input serves as the reference). Uniform soup = equal weights.
register_op("linear", generalized_task_arithmetic, needs_base=False, normalize=True)
