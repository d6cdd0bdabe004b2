"""LoRA: a low-rank update of a linear layer (Hu et al., 2021).

For ``W ∈ R^{out×in}`` LoRA learns ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` and computes::

    y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ,      s = alpha / r   (rank-stabilised: alpha / √r)

so ``ΔW = s · B A``. With the default init (A random, B = 0) the model is unchanged at attach
time. Files use PEFT's names: ``<module>.lora_A.weight`` [r, in], ``<module>.lora_B.weight`` [out, r].
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.utils.errors import DeltaFileError


class LoraConfig(DeltaConfig):
    """``r``: rank; ``alpha``: scale numerator; ``dropout`` on the LoRA input only;
    ``rslora``: scale alpha/√r instead of alpha/r; ``init``: ``kaiming`` (A Kaiming-uniform as in
    PEFT, B zero) or ``gaussian`` (A ~ N(0, 1/r), B zero)."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    bias: Literal["none"] = "none"

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoraBranch(DeltaBranch):
    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__()
        self.lora_A = nn.Linear(in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, out_features, bias=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / config.r)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Run the low-rank path in the LoRA weights' dtype (fp32 under a bf16 base, say) and
        # add in the base output's dtype.
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))).to(base_out.dtype)
        # base_out is a fresh tensor that no backward formula keeps, so the scaled add can write
        # into it: one pass over [tokens, out] instead of three (scale, add, new tensor).
        return base_out.add_(update, alpha=self.scaling)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW = s · B @ A, shape [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


@register
class LoraMethod(DeltaMethod):
    name = "lora"
    config_class = LoraConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True, batched_serving=True)
    default_targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "*": "all-linear"}
    branch_keys = ("lora_A.weight", "lora_B.weight")
    peft_type = "LORA"

    def make_branch(self, module_name: str, module: nn.Module, config: LoraConfig) -> LoraBranch:
        # Half-precision bases keep their LoRA weights in fp32: tiny updates to bf16 weights vanish.
        dtype = torch.float32 if module.weight.dtype in (torch.float16, torch.bfloat16) else module.weight.dtype
        return LoraBranch(module.in_features, module.out_features, config).to(dtype=dtype)

    def to_peft_config(self, config: LoraConfig, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "target_modules": target_patterns,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": config.modules_to_save or None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> LoraConfig:
        unsupported = {
            "use_dora": (False, None),
            "fan_in_fan_out": (False, None),
            "rank_pattern": ({}, None),
            "alpha_pattern": ({}, None),
            "bias": ("none", None),
            "layers_to_transform": (None, []),
        }
        for key, allowed in unsupported.items():
            if key in peft_config and peft_config[key] not in allowed:
                raise DeltaFileError(f"{source}: PEFT LoRA option {key}={peft_config[key]!r} is not supported by deltatune yet")
        targets = peft_config.get("target_modules")
        return LoraConfig(
            r=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout", 0.0) or 0.0),
            rslora=bool(peft_config.get("use_rslora", False)),
            targets=targets if isinstance(targets, list) or targets is None else ("re:" + targets if targets != "all-linear" else targets),
            modules_to_save=list(peft_config.get("modules_to_save") or []),
        )
