"""Stand-in base modules, so a method can build a branch away from a live model.

Tools that work on delta files (merges, the serving pool) build a method's branch over just the
base weights of one module, load the file's tensors into it, and ask it for ``delta_weight()`` or
``low_rank_factors()``: the method's own code interprets its tensors, never the tool's.
"""
from __future__ import annotations

import torch
from torch import nn


class _StubNorm(nn.Module):
    """Stands in for a norm layer (a 1-D weight, "Norm" in the class name) when building a branch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


def stub_module(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A module holding ``weight``/``bias`` of the type a branch expects (Linear for 2-D weights)."""
    if weight.dim() == 2:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        m.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias, requires_grad=False)
        return m
    return _StubNorm(weight, bias)
