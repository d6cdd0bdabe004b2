"""Heterogeneous-batch LoRA: one call applies a *different* LoRA delta to every row of a batch.

S-LoRA / punica style. The adapters resident in memory are stacked per wrapped module::

    A      [S, R, in]    lora_A of slot s, rows beyond the adapter's rank r_s are zero
    B      [S, out, R]   lora_B of slot s *already multiplied by its scale* (alpha / r), columns beyond r_s zero
    x      [b, t, in]    b requests (rows) of t tokens each
    slots  [b] long      the slot of each row's adapter, or -1 for "no adapter"

Semantics (the plain-PyTorch reference, :func:`lora_delta_reference`)::

    y[i] += x[i] @ A[slots[i]].T @ B[slots[i]].T      for every i with slots[i] >= 0

Zero padding makes mixed ranks exact: the padded rank directions contribute ``0 · 0``. The fast
path (:func:`add_batched_lora`) gathers each row's A/B and runs two batched matmuls — no Python
loop over requests or adapters — and only over the rows that have an adapter, so rows with
``-1`` cost nothing and a batch without adapters costs one comparison.
"""
from __future__ import annotations

import torch


def lora_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The LoRA term for every row, one row at a time (slow, obviously correct). Shapes as in the module doc."""
    out = torch.zeros(*x.shape[:-1], B.shape[1], dtype=x.dtype, device=x.device)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            out[i] = (x[i].to(A.dtype) @ A[s].T @ B[s].T).to(x.dtype)
    return out


def add_batched_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``y += lora_delta_reference(x, A, B, slots)`` in place, with gathered batched matmuls.

    ``x``: [b, t, in] (or [b, in]); ``y``: [b, t, out] (or [b, out]); returns ``y``.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, y3 = x.unsqueeze(1), y.unsqueeze(1)
    else:
        y3 = y
    rows = torch.nonzero(slots >= 0).flatten()
    if rows.numel() == 0:
        return y
    if rows.numel() == slots.numel():  # every row has an adapter: no row gather / scatter needed
        s = slots
        xa = torch.bmm(x.to(A.dtype), A.index_select(0, s).transpose(1, 2))        # [b, t, R]
        y3.add_(torch.bmm(xa, B.index_select(0, s).transpose(1, 2)).to(y.dtype))  # [b, t, out]
        return y
    s = slots.index_select(0, rows)
    xa = torch.bmm(x.index_select(0, rows).to(A.dtype), A.index_select(0, s).transpose(1, 2))
    # index_put_ (not index_add_): index_add_ goes parallel even for a handful of rows, slow on a busy CPU.
    y3.index_put_((rows,), torch.bmm(xa, B.index_select(0, s).transpose(1, 2)).to(y.dtype), accumulate=True)
    return y
