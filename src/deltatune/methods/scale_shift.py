"""The scale-and-shift branch shared by SSF, BitFit and norm tuning.

For a module whose output has ``F`` features (a linear layer's ``out_features``, a norm's
``normalized_shape``)::

    y = base(x) ⊙ s + t          s ∈ R^F (init 1, optional), t ∈ R^F (init 0, optional)

Both fold exactly into the module: ``W ← diag(s) W`` (a norm's γ ← s ⊙ γ) and
``b ← s ⊙ b + t``. A module without a bias gets one while merged (``t``) and loses it again on
unmerge, so the inverse is exact and the key names of the unmerged model never change.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.core.method import DeltaBranch
from deltatune.utils.errors import DeltatuneError


def output_features(module: nn.Module) -> int:
    """``F``: the size of the module's last output dimension."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if weight is None:
        raise DeltatuneError(f"{type(module).__name__} has no weight to scale")
    return weight.shape[0]


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and the RMSNorm-style classes of transformers models (a 1-D ``weight``, "Norm" in the name)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.LayerNorm) or (
        "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


class ScaleShiftBranch(DeltaBranch):
    def __init__(self, features: int, scale: bool, shift: bool, dtype: torch.dtype):
        super().__init__()
        if scale:
            self.scale = nn.Parameter(torch.ones(features, dtype=dtype))
        if shift:
            self.shift = nn.Parameter(torch.zeros(features, dtype=dtype))
        self.has_scale, self.has_shift = scale, shift
        self._added_bias = False

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.has_scale:
            base_out = base_out * self.scale.to(base_out.dtype)
        if self.has_shift:
            base_out = base_out + self.shift.to(base_out.dtype)
        return base_out

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        # Everything that can refuse is checked before any weight changes.
        if self.has_scale and (self.scale == 0).any():
            raise DeltatuneError("a scale is exactly 0: merging would lose the weights it scales")
        if self.has_shift and getattr(base, "bias", None) is None and not isinstance(base, nn.Linear):
            raise DeltatuneError(f"cannot merge a shift into {type(base).__name__}: it has no bias to hold it")
        if self.has_scale:
            base.weight.data *= self.scale.view(-1, *[1] * (base.weight.dim() - 1)).to(base.weight.dtype)
            if getattr(base, "bias", None) is not None:
                base.bias.data *= self.scale.to(base.bias.dtype)
        if self.has_shift:
            if getattr(base, "bias", None) is None:
                base.bias = nn.Parameter(torch.zeros_like(self.shift, dtype=base.weight.dtype), requires_grad=False)
                self._added_bias = True
            base.bias.data += self.shift.to(base.bias.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.has_scale and (self.scale == 0).any():
            raise DeltatuneError("a scale is exactly 0: the merge cannot be undone")
        if self.has_shift:
            if self._added_bias:
                base.bias = None
                self._added_bias = False
            else:
                base.bias.data -= self.shift.to(base.bias.dtype)
        if self.has_scale:
            base.weight.data /= self.scale.view(-1, *[1] * (base.weight.dim() - 1)).to(base.weight.dtype)
            if getattr(base, "bias", None) is not None:
                base.bias.data /= self.scale.to(base.bias.dtype)
