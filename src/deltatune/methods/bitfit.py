"""BitFit: train only the biases (Ben Zaken et al., 2022).

As a delta on a frozen base: a bias offset ``t`` per target module, ``y = base(x) + t``
(t = 0 at init), which is exactly training the bias ``b + t``; merging adds it to ``b``. Only
modules that have a bias are targets, so models without biases (llama-style) fail at attach
time with that reason. Parameters: one per output feature of each biased module.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.core.targets import select_targets
from deltatune.methods.scale_shift import ScaleShiftBranch, output_features
from deltatune.utils.errors import TargetError


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None and len(list(module.children())) == 0


class BitFitConfig(DeltaConfig):
    """``targets`` default: every module with a bias (linear layers and LayerNorms)."""

    method: Literal["bitfit"] = "bitfit"


@register
class BitFitMethod(DeltaMethod):
    name = "bitfit"
    config_class = BitFitConfig
    target_kind = "modules with a bias"
    capabilities = Capabilities(mergeable=True, linear_delta=False)
    default_targets = {"*": "re:.*"}
    branch_keys = ("shift",)

    def can_wrap(self, module: nn.Module) -> bool:
        return has_bias(module)

    def resolve_config(self, model: nn.Module, config: BitFitConfig) -> BitFitConfig:
        if config.targets is None:
            try:
                select_targets(model, "re:.*", config.exclude, self.can_wrap, self.target_kind)
            except TargetError:
                raise TargetError(f"bitfit trains biases, and {type(model).__name__} has no module with a bias") from None
        return config

    def make_branch(self, module_name: str, module: nn.Module, config: BitFitConfig) -> ScaleShiftBranch:
        return ScaleShiftBranch(output_features(module), scale=False, shift=True, dtype=module.bias.dtype)
