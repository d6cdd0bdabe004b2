"""``modules_to_save``: a module trained in full (e.g. a freshly initialised classifier head).

The branch holds a trainable copy and replaces the base module's output with the copy's.
Merging swaps the copy's tensors with the base's — a swap is its own inverse, so unmerge is
exact. Saved keys follow PEFT: ``<module>.modules_to_save.<param>``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.core.method import DeltaBranch

FULL_COPY_KEY = "modules_to_save"


class FullCopyBranch(DeltaBranch):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.modules_to_save = copy.deepcopy(module)
        for p in self.modules_to_save.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.modules_to_save(x)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        for (_, p_base), (_, p_copy) in zip(base.named_parameters(), self.modules_to_save.named_parameters()):
            tmp = p_base.data.clone()
            p_base.data.copy_(p_copy.data)
            p_copy.data.copy_(tmp)

    unmerge = merge
