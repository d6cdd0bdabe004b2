"""Shared pieces of the selection tests: pool files, recipes, contexts with constructed embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune.select import prepare, validate_select_recipe


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(tmp_path: Path, strategy: dict, pool: Path, **extra):
    data = {"strategy": strategy, "pool": {"path": str(pool)}, "output": {"path": str(tmp_path / "out" / "selected.jsonl")},
            "embedding": {"model": "no-such-encoder-loaded-in-this-test", "cache_dir": str(tmp_path / "cache")}, "progress": False}
    for key, value in extra.items():
        data[key] = value
    return validate_select_recipe(data)


def clusters(sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Unit vectors in ``len(sizes)`` tight, well-separated clusters; returns (embeddings, cluster id per row)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=g), dim=-1)
    rows, ids = [], []
    for c, n in enumerate(sizes):
        rows.append(centers[c] + spread * torch.randn(n, dim, generator=g))
        ids += [c] * n
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1), ids


def context_with(recipe_obj, pool_emb: torch.Tensor, target_emb: torch.Tensor | None = None):
    """The real context (all checks run) with embeddings given instead of computed."""
    ctx = prepare(recipe_obj)
    ctx._cache["pool"] = pool_emb
    if target_emb is not None:
        ctx._cache["target"] = target_emb
    return ctx
