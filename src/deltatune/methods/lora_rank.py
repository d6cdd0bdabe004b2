"""Incremental rank allocation for LoRA (IncreLoRA-style, Zhang et al., 2023).

Every wrapped module starts with ``initial_r`` active ranks; during training the modules whose
update matters most get more, until the active ranks of all modules sum to ``total_r``.

Ranks are pre-allocated up to ``r`` per module and switched on by a 0/1 mask, so the set of
parameters the optimizer holds never changes::

    y = W x + s · B (m ⊙ A x)          A [r, in], B [out, r], m ∈ {0,1}^r,  s = alpha / r

An inactive rank k gets exactly zero gradient (its A x entry is multiplied by 0, B[:, k] sees a
zero input), so B[:, k] stays 0 from init on and the saved file is a plain rank-r LoRA whose
inactive columns are zero: PEFT loads it with the same logits. The mask is saved as
``<module>.lora_rank_mask`` so training can continue with the same allocation; trainer
checkpoints hold the mask and the importance averages (buffers, see
:meth:`~deltatune.core.method.DeltaBranch.training_state`). On ``train()`` a rank whose B column
is non-zero is also marked active, so parameters copied in without their mask keep their ranks.

Importance of a module (after each optimizer step): the EMA (factor ``importance_beta``) of the
mean sensitivity ``|θ ⊙ ∇θ|`` over its active A rows and B columns — the first-order estimate of
how much the loss would change without them, as in AdaLoRA / IncreLoRA. Every ``grow_every``
steps the ``grow_count`` most important modules that are below ``r`` gain one rank (a fresh
Kaiming-uniform A row with a zero B column, so the output does not jump).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.targets import select_targets
from deltatune.methods.lora import LoraBranch, LoraConfig
from deltatune.utils.errors import ConfigError


class IncrementalLoraBranch(LoraBranch):
    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__(in_features, out_features, config)
        mask = torch.zeros(config.r)
        mask[: config.initial_r] = 1.0
        self.register_buffer("lora_rank_mask", mask)
        self.register_buffer("importance", torch.zeros(()), persistent=False)

    @property
    def rank(self) -> int:
        return int(self.lora_rank_mask.sum().item())

    @torch.no_grad()
    def sync_mask(self) -> None:
        """Mark ranks with a non-zero B column active. A no-op in normal training (inactive columns stay
        exactly 0); after parameters were copied in without their mask, it restores the grown ranks
        instead of silently dropping their trained columns."""
        self.lora_rank_mask.copy_(torch.maximum(self.lora_rank_mask, self.lora_B.weight.ne(0).any(0).to(self.lora_rank_mask.dtype)))

    def train(self, mode: bool = True) -> "IncrementalLoraBranch":
        # model.train() follows loading weights into a model to train: the moment to restore the mask.
        super().train(mode)
        if mode:
            self.sync_mask()
        return self

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))) * self.lora_rank_mask
        return base_out.add_(self.lora_B(hidden).to(base_out.dtype), alpha=self.scaling)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW = s · B diag(m) A, shape [out, in]."""
        return (self.lora_B.weight * self.lora_rank_mask) @ self.lora_A.weight * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], s·B diag(m) [out, r]): masked directions contribute zero columns."""
        return self.lora_A.weight.detach(), self.lora_B.weight.detach() * self.lora_rank_mask * self.scaling

    @torch.no_grad()
    def update_importance(self, beta: float) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.grad is None or b.grad is None:
            return
        on = self.lora_rank_mask > 0
        sensitivity = (a * a.grad).abs()[on].sum() + (b * b.grad).abs()[:, on].sum()
        score = sensitivity / (on.sum() * (a.shape[1] + b.shape[0]))
        self.importance.mul_(beta).add_((1 - beta) * score.float())

    @torch.no_grad()
    def grow(self) -> None:
        """Switch on the next rank: a fresh A row, a zero B column (the output is unchanged)."""
        k = self.rank
        row = torch.empty_like(self.lora_A.weight[k : k + 1])
        nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        self.lora_A.weight[k] = row[0]
        self.lora_B.weight[:, k] = 0
        self.lora_rank_mask[k] = 1.0


def resolve_budget(method, model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Fill the default ``total_r`` (half the pre-allocated ranks) and check it fits the targets."""
    targets = select_targets(model, method.resolve_targets(model, config), config.exclude, method.can_wrap, method.target_kind)
    n = len(targets)
    budget = config.total_r if config.total_r is not None else max(n * config.initial_r, n * config.r // 2)
    if not n * config.initial_r <= budget <= n * config.r:
        raise ConfigError(
            f"lora total_r={budget} must lie between {n * config.initial_r} ({n} modules × initial_r {config.initial_r}) "
            f"and {n * config.r} ({n} modules × r {config.r})"
        )
    return config.model_copy(update={"total_r": budget})


def grow_ranks(branches: dict, config: LoraConfig, step: int) -> list[str]:
    """Update importances; on a growth step give one rank each to the most important modules.

    Returns the names of the modules that grew (empty on other steps or when the budget is spent).
    """
    lora = {name: b for name, b in branches.items() if isinstance(b, IncrementalLoraBranch)}
    for branch in lora.values():
        branch.update_importance(config.importance_beta)
    if step % config.grow_every:
        return []
    room = config.total_r - sum(b.rank for b in lora.values())
    candidates = sorted((name for name, b in lora.items() if b.rank < config.r), key=lambda n: -float(lora[n].importance))
    grown = candidates[: max(0, min(room, config.grow_count))]
    for name in grown:
        lora[name].grow()
    return grown


def rank_report(model) -> dict[str, int]:
    """Active rank per wrapped module of the model's incremental LoRA deltas (``{module: rank}``)."""
    from deltatune.core.inject import iter_wrappers

    inner = getattr(model, "base_model", model)
    return {name: b.rank for name, w in iter_wrappers(inner) for b in w.deltas.values() if isinstance(b, IncrementalLoraBranch)}
