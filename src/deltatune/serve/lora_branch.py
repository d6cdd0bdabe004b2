"""The serving engine's LoRA wrapper: the batched LoRA term at one module, for the rows of the current forward.

The engine installs one :class:`ServedLoraBranch` per decoder projection through the core's
``install_branch`` and, before each forward, tells the shared :class:`LoraContext` which adapter
slot each row uses.
"""
from __future__ import annotations

import torch

from deltatune.core.method import DeltaBranch
from deltatune.serve.adapter_pool import AdapterPool
from deltatune.serve.batched_lora import LoraPlan, add_batched_lora, plan_lora


class LoraContext:
    """Row → adapter slot for the forward in progress (set by the engine, read by every branch).

    Modules differ only in which slots' adapters touch them, so the token grouping
    (:func:`plan_lora`) is built once per distinct pattern per forward and shared."""

    def __init__(self):
        self.slots: list[int] = []
        self.active = False
        self.tokens_per_row = 1
        self.device: torch.device | str = "cpu"
        self._plans: dict[tuple[int, ...], LoraPlan | None] = {}
        self._shared_key: tuple[int, ...] | None = None

    def set(self, slots: list[int], tokens_per_row: int, device, covers_all: list[bool] | None = None) -> None:
        """``covers_all[s]``: slot s's adapter touches every served module (then every module shares one plan)."""
        self.slots, self.tokens_per_row, self.device = slots, tokens_per_row, device
        self.active = any(s >= 0 for s in slots)
        self._plans = {}
        # The usual case (adapters on every projection): skip building a per-module key 200 times a step.
        self._shared_key = tuple(slots) if covers_all is not None and all(covers_all[s] for s in slots if s >= 0) else None

    def plan(self, has: list[bool]) -> LoraPlan | None:
        key = self._shared_key or tuple(s if s >= 0 and has[s] else -1 for s in self.slots)
        if key not in self._plans:
            self._plans[key] = plan_lora(torch.tensor(key, device=self.device), self.tokens_per_row)
        return self._plans[key]


class ServedLoraBranch(DeltaBranch):
    """``base_out + LoRA of each row's adapter`` at one module; rows whose adapter does not touch this module skip it."""

    def __init__(self, pool: AdapterPool, module: str, ctx: LoraContext):
        super().__init__()
        self.pool, self.module, self.ctx = pool, module, ctx

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self.ctx.active:
            return base_out
        plan = self.ctx.plan(self.pool.has_list[self.module])
        return add_batched_lora(base_out, x, self.pool.A[self.module], self.pool.Bt[self.module], None, plan)
