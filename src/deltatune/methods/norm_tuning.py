"""LayerNorm / RMSNorm tuning: train only the normalisation layers' affine parameters.

As a delta: ``y = norm(x) ⊙ s + t`` with ``s`` (init 1) for every norm and ``t`` (init 0) only
for norms that have a bias (LayerNorm; RMSNorm has none). This is exactly tuning ``γ ← s ⊙ γ``
and ``β ← s ⊙ β + t``, and merges into them. Parameters: ``F`` per RMSNorm, ``2F`` per LayerNorm.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.methods.scale_shift import ScaleShiftBranch, is_norm, output_features


class NormTuningConfig(DeltaConfig):
    """``targets`` default: every LayerNorm / RMSNorm of the model."""

    method: Literal["norm_tuning"] = "norm_tuning"


@register
class NormTuningMethod(DeltaMethod):
    name = "norm_tuning"
    config_class = NormTuningConfig
    target_kind = "LayerNorm / RMSNorm"
    capabilities = Capabilities(mergeable=True)
    default_targets = {"*": "re:.*"}
    branch_keys = ("scale", "shift")

    def can_wrap(self, module: nn.Module) -> bool:
        return is_norm(module)

    def make_branch(self, module_name: str, module: nn.Module, config: NormTuningConfig) -> ScaleShiftBranch:
        shift = getattr(module, "bias", None) is not None
        return ScaleShiftBranch(output_features(module), scale=True, shift=shift, dtype=module.weight.dtype)
