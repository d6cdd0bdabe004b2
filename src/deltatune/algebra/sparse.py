"""Composable sparse deltas: a task vector stored as index + value tensors per base tensor.

    delta/
      sparse_delta.safetensors   <tensor>.indices int64 [k] (flat positions), <tensor>.values fp32 [k]
      sparse_delta.json          {"format": "deltatune-sparse", "base": …, "shapes": {tensor: shape}}

A sparse delta is an input of the merge engine like a checkpoint or an adapter (its task vector is
``zeros(shape).view(-1).index_add_(0, indices, values)``), and a merge can write one
(``output.format: sparse``). Adding the deltas of different tasks — a language delta plus a task
delta — is the union of their indices with the weighted values summed (:func:`add_sparse`), or a
``task_arithmetic`` merge of the two directories.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.algebra.ops import magnitude_mask
from deltatune.algebra.stream import TensorFile
from deltatune.utils.errors import DeltaFileError, ShapeMismatchError
from deltatune.utils.io import atomic_dir

SPARSE_FILE = "sparse_delta.safetensors"
SPARSE_META = "sparse_delta.json"
FORMAT = "deltatune-sparse"

Sparse = dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]  # name → (indices, values, shape)


def to_sparse(tensor: torch.Tensor, density: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the non-zero entries of ``tensor`` — or of its top-``density`` share by magnitude."""
    flat = tensor.reshape(-1)
    keep = magnitude_mask(tensor, density).reshape(-1) & (flat != 0) if density is not None else flat != 0
    idx = keep.nonzero().squeeze(1)
    return idx, flat[idx].float()


def top_k_indices(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions (ascending) of the ``k`` entries of largest |tensor|: ``magnitude_mask``'s selection by count.

    Plain equivalent: ``argsort(|t|, descending)[:k].sort()``. The k-th largest magnitude
    (``kthvalue``, linear time) picks the same set unless magnitudes tie at the threshold; only then
    is the full argsort run, so ties break as in :func:`~deltatune.algebra.ops.magnitude_mask`.
    """
    magnitude = tensor.detach().abs().reshape(-1).float()
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n, device=tensor.device)
    idx = (magnitude >= magnitude.kthvalue(n - k + 1).values).nonzero().squeeze(1)
    return idx if idx.numel() == k else torch.argsort(magnitude, descending=True)[:k].sort().values


def to_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 ``zeros(shape).view(-1).index_add_(0, indices, values)``, on the values' device (differentiable in ``values``)."""
    out = torch.zeros(int(torch.tensor(shape).prod()) if shape else 1, device=values.device)
    return out.index_add_(0, indices.long(), values.float()).view(shape)


def add_sparse(deltas: list[Sparse], weights: list[float] | None = None) -> Sparse:
    """Σ_k w_k δ_k as a sparse delta: union of the indices, weighted values summed where they overlap."""
    weights = weights or [1.0] * len(deltas)
    out: Sparse = {}
    for name in dict.fromkeys(n for d in deltas for n in d):
        shapes = {d[name][2] for d in deltas if name in d}
        if len(shapes) > 1:
            raise ShapeMismatchError(f"sparse deltas disagree on the shape of {name!r}: {sorted(shapes)}")
        idx = torch.cat([d[name][0].long() for d in deltas if name in d])
        val = torch.cat([w * d[name][1].float() for d, w in zip(deltas, weights) if name in d])
        uniq, inverse = torch.unique(idx, return_inverse=True)
        out[name] = (uniq, torch.zeros(uniq.numel()).index_add_(0, inverse, val), shapes.pop())
    return out


def write_sparse(path: str | Path, delta: Sparse, base: str | None) -> None:
    tensors, shapes = {}, {}
    for name, (idx, val, shape) in delta.items():
        tensors[f"{name}.indices"], tensors[f"{name}.values"] = idx.long().contiguous(), val.float().contiguous()
        shapes[name] = list(shape)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / SPARSE_FILE), metadata={"format": "pt"})
        (tmp / SPARSE_META).write_text(json.dumps({"format": FORMAT, "base": base, "shapes": shapes}, indent=2) + "\n")


def read_sparse(path: str | Path) -> Sparse:
    inp = SparseInput(Path(path))
    return {n: (inp.file.get(f"{n}.indices"), inp.file.get(f"{n}.values"), tuple(s)) for n, s in inp.shapes.items()}


def is_sparse_dir(path: Path) -> bool:
    return (path / SPARSE_META).is_file()


class SparseInput:
    """A sparse delta directory as a merge input."""

    kind = "sparse"

    def __init__(self, path: Path):
        self.path = path
        try:
            meta = json.loads((path / SPARSE_META).read_text())
        except (OSError, ValueError) as err:
            raise DeltaFileError(f"{path / SPARSE_META}: unreadable ({err})") from None
        if meta.get("format") != FORMAT:
            raise DeltaFileError(f"{path / SPARSE_META}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        self.file = TensorFile([path / SPARSE_FILE], str(path))
        for name in self.shapes:
            for part in ("indices", "values"):
                if f"{name}.{part}" not in self.file.infos:
                    raise DeltaFileError(f"{path / SPARSE_FILE}: tensor {name + '.' + part!r} is missing")
        self.modules = {n.rsplit(".", 1)[0] for n in self.shapes}

    def validate(self, base) -> None:
        for name, shape in self.shapes.items():
            if name not in base.tensors.infos:
                raise ShapeMismatchError(f"sparse delta {str(self.path)!r} changes tensor {name!r}, which the base {base.name!r} does not have; is it for another base?")
            if base.tensors.shape(name) != shape:
                raise ShapeMismatchError(f"sparse delta {str(self.path)!r}: tensor {name!r} has shape {list(shape)}, the base {base.name!r} has {list(base.tensors.shape(name))}")

    def touches(self, module: str) -> bool:
        return module in self.modules

    def task_vectors(self, module: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: to_dense(self.file.get(f"{n}.indices"), self.file.get(f"{n}.values"), self.shapes[n]) for n in base if n in self.shapes}

    def close(self) -> None:
        self.file.close()
