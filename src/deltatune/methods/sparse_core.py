"""Sparse deltas: ΔW holds ``k`` changed entries of a weight matrix, stored as indices + values.

    sparse_indices  [k] int32 (int64 above 2³¹ entries)   flat, row-major positions in W [out, in]
    sparse_values   [k] the weight's dtype                 the changes at those positions
    ΔW = zeros(out·in).scatter(0, indices, values).view(out, in);   h = base(x) + x ΔWᵀ

Entries outside the support are never touched: base + ΔW equals the base bit for bit there.
``k = max(1, ⌊density · out · in⌋)`` per matrix, so a config and a model fix every tensor's
shape and a file for another model fails the loader's shape check. The indices are stored with
the values (not in the config), as ComPEFT stores its packed ``keep`` mask beside the values;
the shared magnitude selection is :func:`deltatune.algebra.ops.magnitude_mask`'s ordering. At
1% density a matrix costs 8 bytes per kept entry (int32 + fp32): 2% of the dense fp32 bytes.

Two sparse deltas compose by addition (:func:`add_sparse`): attached together they give
W + ΔW₁ + ΔW₂, and their sum is again a sparse delta on the union of the supports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import DeltaBranch
from deltatune.utils.errors import ShapeMismatchError

SPARSE_KEYS = ("sparse_indices", "sparse_values")


class SparseDeltaConfig(DeltaConfig):
    """``density``: the share of each target matrix's entries that may change, in (0, 1]."""

    density: float = Field(0.01, gt=0, le=1)


def budget(numel: int, density: float) -> int:
    return max(1, min(numel, int(density * numel)))


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the ``k`` largest entries of ``score``, ascending (argsort order, as magnitude_mask)."""
    return torch.argsort(score.reshape(-1).float(), descending=True)[:k].sort().values


def scatter_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[k] indices + [k] values → the dense [out, in] ΔW (differentiable in ``values``)."""
    return values.new_zeros(shape[0] * shape[1]).scatter(0, indices.long(), values).view(shape)


def add_sparse(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of ΔW_a + ΔW_b on the union of the two supports (shared entries are summed)."""
    idx = torch.cat([a[0].long(), b[0].long()])
    vals = torch.cat([a[1], b[1].to(a[1].dtype)])
    union, inverse = torch.unique(idx, return_inverse=True)
    return union.to(a[0].dtype), vals.new_zeros(union.numel()).index_add(0, inverse, vals)


class SparseBranch(DeltaBranch):
    """``h + x ΔWᵀ`` with ΔW scattered from ``sparse_values`` at ``sparse_indices``."""

    def __init__(self, module_name: str, weight: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.module_name = module_name
        self.shape = (weight.shape[0], weight.shape[1])
        numel = weight.numel()
        self.register_buffer("sparse_indices", indices.to(torch.int32 if numel < 2**31 else torch.int64))
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))
        self._checked_version = self.sparse_indices._version

    def check_indices(self) -> None:
        """A file's indices must address this matrix (a delta saved for another model fails here, by name)."""
        if self.sparse_indices._version == self._checked_version:
            return
        numel = self.shape[0] * self.shape[1]
        idx = self.sparse_indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ShapeMismatchError(f"sparse delta for {self.module_name!r}: index {int(idx.max())} is outside its weight {list(self.shape)} "
                                     f"({numel} entries); the delta was saved for another model")
        if torch.unique(idx).numel() != idx.numel():
            raise ShapeMismatchError(f"sparse delta for {self.module_name!r}: repeated indices in sparse_indices")
        self._checked_version = idx._version

    def sparse_weight(self) -> torch.Tensor:
        self.check_indices()
        return scatter_dense(self.sparse_indices, self.sparse_values, self.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + F.linear(x, self.sparse_weight().to(x.dtype))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.sparse_weight()

    @torch.no_grad()
    def set_support(self, indices: torch.Tensor) -> None:
        """Move the support to ``indices`` (same count) and reset the values to 0 (θ = θ₀ there)."""
        self.sparse_indices.copy_(indices.to(self.sparse_indices.dtype))
        self.sparse_values.zero_()
