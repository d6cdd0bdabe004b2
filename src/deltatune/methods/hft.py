"""HFT, Half Fine-Tuning (Hui et al., 2024): each training stage updates a random half of the
parameter matrices in every layer and freezes the other half, which keeps part of the
pre-trained knowledge intact in every stage.

Every target matrix carries a dense ΔW (``hft_delta`` [out, in], zeros at attach). Stage ``s``
covers optimizer steps ``[s·stage_steps, (s+1)·stage_steps)``; its mask draws, per layer (the
targets sharing a ``….<number>.`` prefix), ``round(fraction · n)`` of that layer's n matrices from
seed ``seed`` and stage ``s`` — the same draw on every run. Frozen matrices get no gradient (their
ΔW is detached in the forward), so their entries stay bit-identical. The stage-0 mask is written
into the config (``active``); ``hft_mask`` [max_stages] records, per matrix, in which stages it
was trained, and is saved with the delta.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.core.targets import select_targets

_LAYER = re.compile(r"^(.*?\.\d+)\.")


class HftConfig(DeltaConfig):
    method: Literal["hft"] = "hft"
    fraction: float = Field(0.5, gt=0, le=1)
    stage_steps: int = Field(100, gt=0)
    seed: int = 0
    max_stages: int = Field(32, gt=0)
    active: list[str] | None = None  # stage-0 mask (filled at attach)


def draw_stage(names: list[str], fraction: float, seed: int, stage: int) -> set[str]:
    """Per layer, ``round(fraction·n)`` (at least 1) of its n matrices, drawn from (seed, stage, layer)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        m = _LAYER.match(name)
        groups.setdefault(m.group(1) if m else "", []).append(name)
    chosen = set()
    for layer, members in groups.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 7_919 + sum(map(ord, layer)))
        n = max(1, round(fraction * len(members)))
        chosen.update(members[i] for i in torch.randperm(len(members), generator=g)[:n].tolist())
    return chosen


class HftBranch(DeltaBranch):
    def __init__(self, weight: torch.Tensor, trainable: bool, max_stages: int):
        super().__init__()
        self.hft_delta = nn.Parameter(torch.zeros_like(weight))
        self.register_buffer("hft_mask", torch.zeros(max_stages, dtype=torch.uint8))
        self.hft_mask[0] = int(trainable)
        self.trainable_now = trainable

    def forward(self, x, base_out):
        delta = self.hft_delta if self.trainable_now else self.hft_delta.detach()
        return base_out + F.linear(x, delta.to(x.dtype))

    def delta_weight(self, base):
        return self.hft_delta.detach().clone()

    def training_state(self):
        return {**super().training_state(), "trainable_now": self.trainable_now}  # the current stage's draw

    def load_training_state(self, state):
        super().load_training_state(state)
        self.trainable_now = state["trainable_now"]


@register
class HftMethod(DeltaMethod):
    name = "hft"
    config_class = HftConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True)
    branch_keys = ("hft_delta", "hft_mask")

    def resolve_config(self, model: nn.Module, config: HftConfig) -> HftConfig:
        if config.active is not None:
            return config
        targets = select_targets(model, self.resolve_targets(model, config), config.exclude, self.can_wrap, self.target_kind)
        return config.model_copy(update={"active": sorted(draw_stage(targets, config.fraction, config.seed, 0))})

    def make_branch(self, module_name: str, module: nn.Module, config: HftConfig) -> HftBranch:
        return HftBranch(module.weight, module_name in (config.active or []), config.max_stages)

    def on_train_step(self, branches, config: HftConfig, step: int) -> None:
        if step % config.stage_steps:
            return
        stage = step // config.stage_steps
        active = draw_stage(list(branches), config.fraction, config.seed, stage)
        for name, branch in branches.items():
            branch.trainable_now = name in active
            if not branch.trainable_now:
                branch.hft_delta.grad = None
            if stage < config.max_stages:
                branch.hft_mask[stage] = int(branch.trainable_now)
