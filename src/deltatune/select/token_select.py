"""Token selection (the ssToken idea): train only on tokens the model has not learned yet.

A "history" copy of the trainable parameters is kept as an exponential moving average,

    θ_hist ← β · θ_hist + (1 - β) · θ          (after every optimizer step)

and per target token ``t`` the excess loss ``Δ_t = ℓ_t(θ) - ℓ_t(θ_hist)`` is measured. Tokens
with ``Δ_t > 0`` (the current model is worse on them than its own recent past: still being
learned, or being forgotten) are kept with ``keep_ratio=None`` (all of them while none has
``Δ_t > 0``, as at the first step where θ_hist = θ); with ``keep_ratio`` (default 0.6, as a ratio
keeps training moving from the first step) the top fraction of target tokens by ``Δ_t`` is kept. The mask is applied by setting the other labels to -100.

Use from a training loop (one extra no-grad forward per step with the history weights)::

    selector = TokenSelector(model, beta=0.99)
    batch = selector(model, batch)        # before the forward/backward of the step
    ...; optimizer.step(); selector.update(model)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.utils.errors import DeltatuneError

IGNORE_INDEX = -100


def token_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-token next-token loss ``[B, T]`` aligned with ``labels`` (position 0 and ignored tokens: 0)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return F.pad(loss, (1, 0))


def selection_mask(current: Tensor, history: Tensor, labels: Tensor, keep_ratio: float | None = None) -> Tensor:
    """Bool ``[B, T]``: target tokens to keep. ``keep_ratio=None``: ``current > history``;
    else the ``ceil(keep_ratio · n_targets)`` targets with the largest ``current - history``."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False  # position 0 is never a target
    excess = (current - history).masked_fill(~valid, float("-inf"))
    if keep_ratio is None:
        keep = valid & (excess > 0)
        # At the start θ_hist = θ and no token has excess loss: train on all rather than on none.
        return keep if keep.any() else valid
    n = int(valid.sum())
    k = max(1, int(torch.ceil(torch.tensor(keep_ratio * n)))) if n else 0
    mask = torch.zeros_like(valid)
    if k:
        mask.view(-1)[excess.view(-1).topk(k).indices] = True
    return mask & valid


class TokenSelector:
    """EMA history of the trainable parameters + the per-token mask it gives."""

    def __init__(self, model: nn.Module, beta: float = 0.99, keep_ratio: float | None = 0.6):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta, self.keep_ratio = beta, keep_ratio
        self.history = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.kept_fraction = 1.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.history:
                self.history[n].mul_(self.beta).add_(p.detach(), alpha=1 - self.beta)

    def state_dict(self) -> dict[str, Tensor]:
        """The history weights, for trainer checkpoints (a resumed run builds the selector from θ, not θ_hist)."""
        return dict(self.history)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.history):
            raise DeltatuneError(f"token selector checkpoint holds {len(state)} history tensors, the model trains {len(self.history)}; "
                                 "resume with the recipe the run was started with")
        for n, v in state.items():
            self.history[n].copy_(v)

    @contextlib.contextmanager
    def history_weights(self, model: nn.Module):
        """Temporarily swap the history values into the model's trainable parameters."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.history}
        with torch.no_grad():
            for n, v in self.history.items():
                params[n].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        current = token_losses(model, batch)
        with self.history_weights(model):
            history = token_losses(model, batch)
        mask = selection_mask(current, history, batch["labels"], self.keep_ratio)
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.kept_fraction = float(mask.sum()) / max(1, int(targets))
        labels = batch["labels"].masked_fill(~mask, IGNORE_INDEX)
        return {**batch, "labels": labels}
