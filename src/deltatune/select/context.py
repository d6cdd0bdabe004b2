"""What a strategy sees: the checked pool (and target), the budget, and lazy model access.

Embeddings and likelihood scores are computed on first use only, so a strategy that needs no
model (exact-hash dedup) loads none, and every input check has run before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltatune.select.config import SelectRecipe
from deltatune.select.embed import TextEmbedder
from deltatune.select.pool import Pool
from deltatune.select.score import LikelihoodScorer


@dataclass
class SelectionContext:
    recipe: SelectRecipe
    pool: Pool
    target: Pool | None
    budget: int | None
    embedder: TextEmbedder
    _cache: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def progress(self) -> bool:
        return self.recipe.progress

    def pool_embeddings(self) -> torch.Tensor:
        """``[n_pool, d]`` unit rows."""
        if "pool" not in self._cache:
            self._cache["pool"] = self.embedder.embed(self.pool.texts, desc="embed pool")
        return self._cache["pool"]

    def target_embeddings(self) -> torch.Tensor:
        if self.target is None:
            raise ValueError("no target sample")
        if "target" not in self._cache:
            self._cache["target"] = self.embedder.embed(self.target.texts, desc="embed target")
        return self._cache["target"]

    def scorer(self) -> LikelihoodScorer:
        if "scorer" not in self._cache:
            self._cache["scorer"] = LikelihoodScorer(self.recipe.model, self.recipe.pool.columns, progress=self.progress)
        return self._cache["scorer"]

    def generator(self, salt: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(hash_seed(self.seed, salt))


def hash_seed(seed: int, salt: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
