"""DSEE (Chen et al., 2023, "Dually Sparsity-Embedded Efficient Tuning"): W + s·BA + S.

A LoRA update (A [r, in], Kaiming init; B [out, r], zeros; s = alpha / r) plus a sparse residual S
on a magnitude-selected support: the ``k = ⌊density·out·in⌋`` entries of largest |W| of the frozen
weight. ΔW = s·BA + S is linear and merges like LoRA. Files: ``lora_A.weight``, ``lora_B.weight``,
``sparse_indices``, ``sparse_values``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.algebra.sparse import top_k_indices
from deltatune.methods.sparse_core import SPARSE_KEYS, SparseBranch, SparseDeltaConfig, budget


class DseeConfig(SparseDeltaConfig):
    method: Literal["dsee"] = "dsee"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)


class DseeBranch(SparseBranch):
    def __init__(self, module_name: str, weight: torch.Tensor, config: DseeConfig):
        super().__init__(module_name, weight, top_k_indices(weight.detach().abs(), budget(weight.numel(), config.density)))
        self.scale = config.alpha / config.r
        self.lora_A = nn.Linear(weight.shape[1], config.r, bias=False, dtype=weight.dtype, device=weight.device)
        self.lora_B = nn.Linear(config.r, weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, base_out):
        return base_out + self.scale * self.lora_B(self.lora_A(x)) + F.linear(x, self.sparse_weight().to(x.dtype))

    def delta_weight(self, base):
        return self.scale * (self.lora_B.weight @ self.lora_A.weight) + self.sparse_weight()


@register
class DseeMethod(DeltaMethod):
    name = "dsee"
    config_class = DseeConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True)
    branch_keys = ("lora_A.weight", "lora_B.weight", *SPARSE_KEYS)

    def make_branch(self, module_name: str, module: nn.Module, config: DseeConfig) -> DseeBranch:
        return DseeBranch(module_name, module.weight, config)
