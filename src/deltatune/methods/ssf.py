"""SSF: Scaling & Shifting your Features (Lian et al., 2022).

A learned per-feature scale and shift after each target module: ``y = base(x) ⊙ γ + β``
(γ = 1, β = 0 at init). Merges exactly into the preceding linear or norm layer
(:mod:`deltatune.methods.scale_shift`). Parameters: ``2 · out_features`` per module.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.methods.scale_shift import ScaleShiftBranch, is_norm, output_features


class SSFConfig(DeltaConfig):
    """``targets`` default ``all-linear``; norm layers may be named too."""

    method: Literal["ssf"] = "ssf"


@register
class SSFMethod(DeltaMethod):
    name = "ssf"
    config_class = SSFConfig
    target_kind = "nn.Linear or norm"
    capabilities = Capabilities(mergeable=True)
    branch_keys = ("scale", "shift")

    def can_wrap(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_norm(module)

    def make_branch(self, module_name: str, module: nn.Module, config: SSFConfig) -> ScaleShiftBranch:
        # A shift needs somewhere to merge: a linear layer (which can take a bias) or a norm with a bias.
        shift = isinstance(module, nn.Linear) or getattr(module, "bias", None) is not None
        return ScaleShiftBranch(output_features(module), scale=True, shift=shift, dtype=module.weight.dtype)
