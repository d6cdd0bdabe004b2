"""LT-SFT, Lottery-Ticket Sparse Fine-Tuning (Ansell et al., 2022, "Composable Sparse Fine-Tuning").

Phase 1 (``dense_steps`` optimizer steps): every target matrix trains a dense ΔW (W + ΔW).
At the end of phase 1 (the trainer's ``on_train_step``), per matrix keep the
``k = ⌊density·out·in⌋`` entries with the largest |θ_ft − θ₀| = |ΔW|, reset everything to θ₀
(values 0) and retrain only those ``k`` entries: the result is a sparse delta (indices + values,
see :mod:`deltatune.methods.sparse_core`). With ``dense_steps: 0`` the support is drawn at random
(seed ``seed``) and only phase 2 runs. Two LT-SFT deltas (a language/domain delta and a task
delta) compose by addition: attach both and make both active.

Phase 1's dense ΔW is released after the selection; its AdamW moments stay allocated in the
optimizer until the run ends (the trainer does not rebuild the optimizer).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.algebra.sparse import top_k_indices
from deltatune.methods.sparse_core import SPARSE_KEYS, SparseBranch, SparseDeltaConfig, budget
from deltatune.utils.errors import DeltatuneError


class LtSftConfig(SparseDeltaConfig):
    method: Literal["lt_sft"] = "lt_sft"
    dense_steps: int = Field(0, ge=0)
    seed: int = 0


def random_support(numel: int, k: int, seed: int, module_name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, module_name)))
    return torch.randperm(numel, generator=g)[:k].sort().values


class LtSftBranch(SparseBranch):
    def __init__(self, module_name: str, weight: torch.Tensor, config: LtSftConfig):
        k = budget(weight.numel(), config.density)
        super().__init__(module_name, weight, random_support(weight.numel(), k, config.seed, module_name))
        self.dense_phase = config.dense_steps > 0
        if self.dense_phase:
            self.dense_delta = nn.Parameter(torch.zeros_like(weight))

    def saved_state(self):
        if self.dense_phase:
            raise DeltatuneError(f"lt_sft delta at {self.module_name!r} is still in its dense phase (dense_steps not reached); "
                                 "train past dense_steps before saving or merging it")
        return {k: v for k, v in self.state_dict().items() if k in SPARSE_KEYS}

    def forward(self, x, base_out):
        if self.dense_phase:
            return base_out + torch.nn.functional.linear(x, self.dense_delta.to(x.dtype))
        return super().forward(x, base_out)

    def delta_weight(self, base):
        return self.dense_delta.detach().clone() if self.dense_phase else super().delta_weight(base)

    @torch.no_grad()
    def select(self) -> None:
        """End of phase 1: support = top-k of |ΔW|, everything reset to θ₀, the dense ΔW released."""
        self.set_support(top_k_indices(self.dense_delta.abs(), self.sparse_values.numel()))
        self.release_dense()

    def release_dense(self) -> None:
        self.dense_delta.requires_grad_(False)
        self.dense_delta.grad = None
        self.dense_delta.data = torch.empty(0, dtype=self.dense_delta.dtype, device=self.dense_delta.device)
        self.dense_phase = False

    def training_state(self):
        return {**super().training_state(), "dense_phase": self.dense_phase}

    def load_training_state(self, state):
        super().load_training_state(state)  # the selected support is the sparse_indices buffer
        if self.dense_phase and not state["dense_phase"]:
            self.release_dense()  # before the checkpoint's (empty) dense_delta is loaded into it


@register
class LtSftMethod(DeltaMethod):
    name = "lt_sft"
    config_class = LtSftConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True)
    branch_keys = SPARSE_KEYS

    def make_branch(self, module_name: str, module: nn.Module, config: LtSftConfig) -> LtSftBranch:
        return LtSftBranch(module_name, module.weight, config)

    def saved_config(self, config: LtSftConfig) -> LtSftConfig:
        # A saved LT-SFT delta is the phase-2 result: loading it attaches the sparse branches directly.
        return config.model_copy(update={"dense_steps": 0})

    def on_train_step(self, branches, config: LtSftConfig, step: int) -> None:
        if config.dense_steps and step == config.dense_steps:
            for branch in branches.values():
                if branch.dense_phase:  # a finished delta kept active while another trains (step counts restart) is left alone
                    branch.select()
