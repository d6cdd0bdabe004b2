"""LIFT (Liu et al., 2025, "Principal weights emerge after rank reduction"): fine-tune only the
principal weights — per matrix, the ``k = ⌊density·out·in⌋`` entries of largest |W_r|, where
``W_r = U_r Σ_r V_rᵀ`` is the rank-``rank`` SVD approximation of the frozen weight. The support is
chosen at attach time from the base weights; the trained change is a sparse delta (indices + values).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.algebra.sparse import top_k_indices
from deltatune.methods.sparse_core import SPARSE_KEYS, SparseBranch, SparseDeltaConfig, budget
from deltatune.utils.errors import TargetError


class LiftConfig(SparseDeltaConfig):
    method: Literal["lift"] = "lift"
    rank: int = Field(8, gt=0)


def principal_support(weight: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    """Top-k positions of |W_r| (W_r: the rank-r truncated SVD of W)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return top_k_indices(low.abs(), k)


@register
class LiftMethod(DeltaMethod):
    name = "lift"
    config_class = LiftConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True)
    branch_keys = SPARSE_KEYS

    def make_branch(self, module_name: str, module: nn.Module, config: LiftConfig) -> SparseBranch:
        w = module.weight
        if config.rank > min(w.shape):
            raise TargetError(f"lift: rank {config.rank} is larger than the smaller dimension of {module_name!r} {list(w.shape)}")
        return SparseBranch(module_name, w, principal_support(w, config.rank, budget(w.numel(), config.density)))
