"""Weight-space diagnostics of a delta: what did it change, and how?

For one weight matrix W [out, in] and its tuned version W' = W + ΔW:

- the singular values of ΔW and its *effective rank* (Roy & Vetterli, 2007)::

      p_i = σ_i / Σ_j σ_j,   erank(ΔW) = exp(−Σ_i p_i log p_i)

  (1 for a rank-1 update, min(out, in) for a flat spectrum);
- the *intruder dimensions* of "LoRA vs Full Fine-tuning: an Illusion of Equivalence"
  (Shuttleworth et al., 2024): among the top-k left singular vectors u'_j of W', those whose
  largest |cosine| with every left singular vector u_i of W is below a threshold ε::

      intruders = #{ j ≤ k : max_i |u'_jᵀ u_i| < ε }

  The paper finds them in LoRA updates and (far fewer) in full fine-tuning;
- the norms ‖ΔW‖_F and ‖ΔW‖_F / ‖W‖_F, also summed per layer.

ΔW comes from the method's own ``delta_weight()`` (every linear delta offers it), or, for a full
fine-tune, from the two checkpoints; non-linear deltas (adapters, prefixes) have no ΔW and are
listed as skipped.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from deltatune.core.inject import iter_wrappers

INTRUDER_TOP_K = 10
INTRUDER_THRESHOLD = 0.5


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (0 for an all-zero matrix)."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def matrix_diagnostics(base: torch.Tensor, delta: torch.Tensor, top_k: int = INTRUDER_TOP_K, threshold: float = INTRUDER_THRESHOLD,
                       spectrum: int = 32) -> dict:
    """Diagnostics of ``delta`` [out, in] on ``base`` [out, in] (see the module docstring)."""
    w, dw = base.double(), delta.double()
    s = torch.linalg.svdvals(dw)
    u_base = torch.linalg.svd(w, full_matrices=False).U
    u_tuned = torch.linalg.svd(w + dw, full_matrices=False).U[:, :top_k]
    best = (u_tuned.T @ u_base).abs().max(dim=1).values  # [k]: each tuned direction's closest base direction
    norm, base_norm = float(dw.norm()), float(w.norm())
    return {
        "shape": list(dw.shape),
        "norm": norm,
        "relative_norm": norm / base_norm if base_norm else float("inf"),
        "effective_rank": effective_rank(s),
        "top_singular_values": s[:spectrum].tolist(),
        "intruders": int((best < threshold).sum()),
    }


def _layer_of(module: str) -> int | None:
    found = re.search(r"(?:layers|layer|h|blocks)\.(\d+)\.", module + ".")
    return int(found.group(1)) if found else None


def summarize(rows: dict[str, dict]) -> dict:
    """Totals over modules: intruders, mean effective rank, and ‖ΔW‖_F per layer (root of summed squares)."""
    per_layer: dict[int, float] = {}
    for module, row in rows.items():
        layer = _layer_of(module)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0.0) + row["norm"] ** 2
    return {
        "modules": len(rows),
        "intruders": sum(r["intruders"] for r in rows.values()),
        "mean_effective_rank": sum(r["effective_rank"] for r in rows.values()) / len(rows) if rows else 0.0,
        "norm_per_layer": {str(k): v ** 0.5 for k, v in sorted(per_layer.items())},
    }


def delta_pairs(model, name: str = "default") -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(module, base weight, ΔW or None when the delta has no weight-space form) for every module
    where delta ``name`` of a DeltaModel acts."""
    for module, wrapper in iter_wrappers(model.base_model):
        if name not in wrapper.deltas:
            continue
        branch, base = wrapper.deltas[name], wrapper.base_layer
        weight = getattr(base, "weight", None)
        try:
            delta = branch.delta_weight(base).detach()
        except NotImplementedError:
            delta = None
        if weight is None or delta is None or delta.shape != weight.shape or weight.dim() != 2:
            yield module, weight, None
        else:
            yield module, weight.detach(), delta


def diagnose(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor | None]], top_k: int = INTRUDER_TOP_K, threshold: float = INTRUDER_THRESHOLD) -> dict:
    """``{"modules": {name: diagnostics}, "skipped": [names], "summary": {...}}`` over (module, W, ΔW) pairs."""
    rows, skipped = {}, []
    for module, weight, delta in pairs:
        if delta is None:
            skipped.append(module)
        else:
            rows[module] = matrix_diagnostics(weight, delta, top_k, threshold)
    return {"modules": rows, "skipped": skipped, "summary": summarize(rows), "top_k": top_k, "threshold": threshold}


def full_finetune_pairs(base_state: dict[str, torch.Tensor], tuned_state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module, W, W' − W) for every 2-D ``*.weight`` both state dicts hold with one shape, except embeddings and heads."""
    for key, w in base_state.items():
        tuned = tuned_state.get(key)
        if not key.endswith(".weight") or w.dim() != 2 or tuned is None or tuned.shape != w.shape or "embed" in key or "lm_head" in key:
            continue
        yield key[: -len(".weight")], w, tuned.float() - w.float()
