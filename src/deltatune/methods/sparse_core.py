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

One representation serves training and the delta algebra: the selection (``top_k_indices``),
the dense view (``to_dense``) and the sum (``add_sparse``) are those of
:mod:`deltatune.algebra.sparse`, which a merge reads and writes. Two sparse deltas compose by
addition: attached together they give W + ΔW₁ + ΔW₂; :func:`sparse_delta` turns attached
branches into the algebra's ``{tensor: (indices, values, shape)}``, whose ``add_sparse`` is again a
sparse delta on the union of the supports, and a saved delta directory is a merge input as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.algebra.sparse import Sparse, to_dense
from deltatune.core.config import DeltaConfig
from deltatune.core.method import DeltaBranch
from deltatune.utils.errors import ShapeMismatchError

SPARSE_KEYS = ("sparse_indices", "sparse_values")


class SparseDeltaConfig(DeltaConfig):
    """``density``: the share of each target matrix's entries that may change, in (0, 1]."""

    density: float = Field(0.01, gt=0, le=1)


def budget(numel: int, density: float) -> int:
    return max(1, min(numel, int(density * numel)))


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
        # fp32 accumulation then the values' dtype: each position is written once, so the cast is exact.
        return to_dense(self.sparse_indices, self.sparse_values, self.shape).to(self.sparse_values.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + F.linear(x, self.sparse_weight().to(x.dtype))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.sparse_weight()

    @torch.no_grad()
    def set_support(self, indices: torch.Tensor) -> None:
        """Move the support to ``indices`` (same count) and reset the values to 0 (θ = θ₀ there)."""
        self.sparse_indices.copy_(indices.to(self.sparse_indices.dtype))
        self.sparse_values.zero_()


def sparse_delta(model: nn.Module, name: str = "default") -> Sparse:
    """The sparse branches of delta ``name`` in ``model`` as ``{"<module>.weight": (indices, values, shape)}``.

    Keys are the logical module names (those of the unwrapped model, i.e. of its checkpoint), so the
    result feeds :func:`deltatune.algebra.sparse.add_sparse` and ``write_sparse`` (a merge input).
    """
    from deltatune.core.inject import iter_wrappers

    out: Sparse = {}
    for module_name, wrapper in iter_wrappers(getattr(model, "base_model", model)):
        branch = wrapper.deltas[name] if name in wrapper.deltas else None
        if isinstance(branch, SparseBranch):
            branch.check_indices()
            out[f"{module_name}.weight"] = (branch.sparse_indices.detach().long().cpu(), branch.sparse_values.detach().float().cpu(), branch.shape)
    if not out:
        raise ShapeMismatchError(f"sparse_delta: the model has no sparse branches of a delta named {name!r}")
    return out
