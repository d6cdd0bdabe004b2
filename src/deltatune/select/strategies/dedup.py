"""Duplicate removal: exact hash, then embedding cosine above a threshold.

Items are visited in pool order. An item is dropped if its normalised text (lower case,
whitespace collapsed, unless ``normalize: false``) hashes like an earlier kept item's, or if
``max_j cos(e_i, e_j) >= threshold`` over the earlier *kept* items ``j`` — so of a group of
near-duplicates the first one stays. ``threshold: null`` does exact dedup only (no model).
With a budget, the first ``budget`` survivors are kept.
"""
from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from deltatune.select.registry import Selection, StrategyConfig, register_strategy


class DedupConfig(StrategyConfig):
    name: str = "dedup"
    exact: bool = True
    normalize: bool = True
    threshold: float | None = Field(0.95, gt=0, le=1)
    block_size: int = Field(1024, ge=1)


def _key(text: str, normalize: bool) -> str:
    text = " ".join(text.lower().split()) if normalize else text
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def near_duplicate_filter(emb: torch.Tensor, candidates: list[int], threshold: float, block_size: int = 1024) -> tuple[list[int], dict[int, tuple[int, float]]]:
    """``(kept, dropped)`` for the rows ``candidates`` of unit embeddings ``emb``, greedily in order.

    Naive reference: ``for i in candidates: keep i unless max(emb[kept] @ emb[i]) >= threshold``.
    Blocked: each block is compared to everything kept before it with one matmul, then within
    itself in order. ``dropped[i] = (j, cosine)`` names the kept item ``i`` duplicates.
    """
    kept: list[int] = []
    kept_emb = emb.new_zeros((0, emb.shape[1]))
    dropped: dict[int, tuple[int, float]] = {}
    for start in range(0, len(candidates), block_size):
        block = candidates[start:start + block_size]
        e = emb[block]
        if len(kept):
            best, arg = (e @ kept_emb.T).max(1)
        else:
            best, arg = torch.full((len(block),), -2.0), torch.zeros(len(block), dtype=torch.long)
        inner = e @ e.T
        new_local: list[int] = []
        for r, i in enumerate(block):
            b, j = float(best[r]), (kept[int(arg[r])] if len(kept) else -1)
            if new_local:
                s, a = inner[r, new_local].max(0)
                if float(s) > b:
                    b, j = float(s), block[new_local[int(a)]]
            if b >= threshold:
                dropped[i] = (j, b)
            else:
                new_local.append(r)
        kept += [block[r] for r in new_local]
        kept_emb = torch.cat([kept_emb, e[new_local]])
    return kept, dropped


@register_strategy(DedupConfig, needs_budget=False)
def select_dedup(ctx, config: DedupConfig) -> Selection:
    """Exact-hash and embedding-cosine duplicate removal (first occurrence kept)."""
    items = ctx.pool.items
    seen: dict[str, int] = {}
    survivors, removed = [], []
    for it in items:
        key = _key(it.text, config.normalize) if config.exact else None
        if key is not None and key in seen:
            removed.append({"origin": it.origin, "duplicate_of": items[seen[key]].origin, "kind": "exact"})
            continue
        if key is not None:
            seen[key] = it.index
        survivors.append(it.index)
    scores = {i: {} for i in survivors}
    if config.threshold is not None and len(survivors) > 1:
        emb = ctx.pool_embeddings()
        survivors, dropped = near_duplicate_filter(emb, survivors, config.threshold, config.block_size)
        for i, (j, cos) in dropped.items():
            removed.append({"origin": items[i].origin, "duplicate_of": items[j].origin, "kind": "near", "cosine": round(cos, 4)})
        # Why each survivor stayed: its highest cosine to any other kept item is below the threshold.
        sub = emb[survivors]
        for start in range(0, len(survivors), config.block_size):
            sims = sub[start:start + config.block_size] @ sub.T
            idx = torch.arange(start, min(start + config.block_size, len(survivors)))
            sims[torch.arange(len(idx)), idx] = -2.0
            best = sims.max(1).values if len(survivors) > 1 else torch.full((len(idx),), -1.0)
            for r, k in enumerate(idx.tolist()):
                scores[survivors[k]] = {"max_cosine_to_kept": float(best[r])}
    if ctx.budget is not None:
        survivors = survivors[: ctx.budget]
    rule = "no exact duplicate earlier" + (f" and cosine below {config.threshold} to every earlier kept item" if config.threshold is not None else "")
    return Selection(survivors, {i: scores[i] for i in survivors}, reason=rule,
                     summary={"exact_removed": sum(r["kind"] == "exact" for r in removed),
                              "near_removed": sum(r["kind"] == "near" for r in removed), "removed": removed})
