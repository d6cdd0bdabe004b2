"""(IA)³: learned rescaling of activations (Liu et al., 2022, "Few-Shot PEFT is Better and Cheaper").

For attention projections (keys, values) the *output* is scaled, for the FFN's down projection
the *input* (PEFT's convention)::

    output-scaled:  y = (x Wᵀ + b) ⊙ l          l ∈ R^{out}, merged as W ← diag(l) W, b ← l ⊙ b
    input-scaled:   y = (x ⊙ l) Wᵀ + b          l ∈ R^{in},  merged as W ← W diag(l)

``l`` starts at 1, so the model is unchanged at attach time. Merging multiplies the weights and
unmerging divides them back (exact up to float rounding). Files use PEFT's key ``<module>.ia3_l``
with shape [out, 1] (output-scaled) or [1, in] (input-scaled).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.core.targets import matches
from deltatune.utils.errors import DeltatuneError

DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "bert": ["key", "value", "output.dense"]}
DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "bert": ["output.dense"]}


class IA3Config(DeltaConfig):
    """``targets``: modules to rescale; ``feedforward``: the subset whose *input* is rescaled
    (default per architecture: llama ``down_proj``, BERT ``output.dense``)."""

    method: Literal["ia3"] = "ia3"
    feedforward: list[str] | None = None


class IA3Branch(DeltaBranch):
    def __init__(self, features: int, input_side: bool, dtype: torch.dtype):
        super().__init__()
        self.transforms_input = input_side
        shape = (1, features) if input_side else (features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.flatten().to(x.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.transforms_input:
            return base_out
        return base_out * self.ia3_l.flatten().to(base_out.dtype)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if (self.ia3_l == 0).any():  # checked before touching W: a zero scale cannot be undone
            raise DeltatuneError("an (IA)³ scale is exactly 0: merging would lose the weights it scales")
        base.weight.data *= self.ia3_l.to(base.weight.dtype)
        if not self.transforms_input and base.bias is not None:
            base.bias.data *= self.ia3_l.flatten().to(base.bias.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if (self.ia3_l == 0).any():
            raise DeltatuneError("an (IA)³ scale is exactly 0: the merge cannot be undone")
        base.weight.data /= self.ia3_l.to(base.weight.dtype)
        if not self.transforms_input and base.bias is not None:
            base.bias.data /= self.ia3_l.flatten().to(base.bias.dtype)


@register
class IA3Method(DeltaMethod):
    name = "ia3"
    config_class = IA3Config
    capabilities = Capabilities(mergeable=True, linear_delta=False)
    default_targets = {**DEFAULT_TARGETS, "*": "all-linear"}
    branch_keys = ("ia3_l",)
    peft_type = "IA3"

    def resolve_config(self, model: nn.Module, config: IA3Config) -> IA3Config:
        if config.feedforward is not None:
            return config
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return config.model_copy(update={"feedforward": DEFAULT_FEEDFORWARD.get(model_type, [])})

    def make_branch(self, module_name: str, module: nn.Module, config: IA3Config) -> IA3Branch:
        input_side = any(matches(p, module_name) for p in config.feedforward or [])
        return IA3Branch(module.in_features if input_side else module.out_features, input_side, module.weight.dtype)

    def to_peft_config(self, config: IA3Config, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        # Exact names: PEFT needs feedforward_modules to be a subset of target_modules, which
        # short patterns cannot always express (BERT's "output.dense" vs leaf "dense").
        return {
            "peft_type": "IA3",
            "target_modules": target_names,
            "feedforward_modules": [n for n in target_names if any(matches(p, n) for p in config.feedforward or [])],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": config.modules_to_save or None,
        }

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> IA3Config:
        ff = peft_config.get("feedforward_modules") or []
        targets = peft_config.get("target_modules")
        return IA3Config(
            targets=targets if isinstance(targets, list) or targets is None else "re:" + targets,
            feedforward=ff if isinstance(ff, list) else ["re:" + ff],
            modules_to_save=list(peft_config.get("modules_to_save") or []),
        )
