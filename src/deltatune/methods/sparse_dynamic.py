"""SpIEL-style dynamic sparse fine-tuning (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to LLMs").

Each target matrix has a fixed budget of ``k = ⌊density·out·in⌋`` active indices (start: random,
seed ``seed``). Every ``update_every`` optimizer steps, per matrix:

    drop   the ⌊drop_fraction·k⌋ active entries whose value changed least (smallest |Δθ|)
    regrow as many inactive entries with the largest |∂L/∂W| of that step, at value 0

The delta and its optimizer state are [k]-sized; only on an update step does the branch keep the
dense gradient of its ΔW (one matrix at a time is scattered for the forward anyway). The Adam
moments of a slot that moves to a new index are kept (the trainer owns the optimizer).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.methods.lt_sft import random_support
from deltatune.methods.sparse_core import SPARSE_KEYS, SparseBranch, SparseDeltaConfig, budget


class SparseDynamicConfig(SparseDeltaConfig):
    method: Literal["sparse_dynamic"] = "sparse_dynamic"
    update_every: int = Field(20, gt=0)
    drop_fraction: float = Field(0.1, gt=0, le=1)
    seed: int = 0


class SparseDynamicBranch(SparseBranch):
    def __init__(self, module_name: str, weight: torch.Tensor, config: SparseDynamicConfig):
        k = budget(weight.numel(), config.density)
        super().__init__(module_name, weight, random_support(weight.numel(), k, config.seed, module_name))
        self.update_every = config.update_every
        self.steps = 0
        self._dense = None

    def forward(self, x, base_out):
        dense = self.sparse_weight()
        if torch.is_grad_enabled() and dense.requires_grad and (self.steps + 1) % self.update_every == 0:
            dense.retain_grad()  # ∂L/∂ΔW = ∂L/∂W: the regrowth score
            self._dense = dense
        return base_out + torch.nn.functional.linear(x, dense.to(x.dtype))

    def training_state(self):
        return {**super().training_state(), "steps": self.steps}  # the moved indices are the sparse_indices buffer

    def load_training_state(self, state):
        super().load_training_state(state)
        self.steps = state["steps"]

    @torch.no_grad()
    def update_support(self, drop_fraction: float) -> int:
        """Drop the least-changed entries, regrow by gradient magnitude; returns how many moved."""
        self.steps += 1
        dense, self._dense = self._dense, None
        if self.steps % self.update_every or dense is None or dense.grad is None:
            return 0
        k = self.sparse_values.numel()
        n = min(int(drop_fraction * k), dense.numel() - k)
        if n <= 0:
            return 0
        slots = torch.argsort(self.sparse_values.detach().abs().float())[:n]
        score = dense.grad.detach().abs().reshape(-1).float().clone()
        score[self.sparse_indices.long()] = -1.0  # only inactive entries can grow
        grown = torch.argsort(score, descending=True)[:n]
        self.sparse_indices[slots] = grown.to(self.sparse_indices.dtype)
        self.sparse_values[slots] = 0
        return n


@register
class SparseDynamicMethod(DeltaMethod):
    name = "sparse_dynamic"
    config_class = SparseDynamicConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True)
    branch_keys = SPARSE_KEYS

    def make_branch(self, module_name: str, module: nn.Module, config: SparseDynamicConfig) -> SparseDynamicBranch:
        return SparseDynamicBranch(module_name, module.weight, config)

    def on_train_step(self, branches, config: SparseDynamicConfig, step: int) -> None:
        for branch in branches.values():
            branch.update_support(config.drop_fraction)
