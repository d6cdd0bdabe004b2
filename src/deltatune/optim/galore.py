"""GaLore (Zhao et al., 2024): Adam in a low-rank gradient subspace.

For a 2-D parameter W [m, n] with gradient G, every ``update_gap`` steps (and at the first) take
the top-r singular vectors of G; with m ≥ n project from the left, else from the right, so the
moments live in the *smaller* of the two shapes::

    m ≥ n:  P = U[:, :r]  [m, r]     R = Pᵀ G [r, n]     update = α · P · Adam(R)      [m, n]
    m < n:  Q = V[:, :r]  [n, r]     R = G Q  [m, r]     update = α · Adam(R) · Qᵀ     [m, n]
    W ← W · (1 − lr·wd) − lr · update

``Adam(R)`` is Adam's bias-corrected m̂ / (√v̂ + ε) on the projected gradient; the moments are
[r, n] (or [m, r]) instead of [m, n]. With P = I and α = 1 this is exactly AdamW. Parameters
that are not projected (biases, norms, the embeddings and the LM head) get plain AdamW.

``layerwise=True`` (GaLore's per-layer weight update, §4.3 of the paper): each parameter is
updated by a hook as soon as its gradient is complete, and the gradient is freed, so the full
set of gradients never exists at once — without it a step still holds a full-size gradient per
weight, and GaLore saves only the optimizer state. The step then runs its own backward
(``owns_step``, as LOMO); gradient clipping takes a norm-only first pass (see
:func:`deltatune.optim.lomo.fused_train_step`), so the update equals clip-then-step exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from deltatune.optim import named_parameters_of, register_optimizer
from deltatune.optim.lomo import fused_hook, fused_train_step, group_of_params
from deltatune.utils.errors import ConfigError

Projector = Callable[[torch.Tensor, int], torch.Tensor]


def svd_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r basis of the side that is projected: U[:, :r] [m, r] if m ≥ n, else V[:, :r] [n, r]."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return u[:, :rank].contiguous() if grad.shape[0] >= grad.shape[1] else vh[:rank].T.contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return basis.T @ grad if grad.shape[0] >= grad.shape[1] else grad @ basis


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return basis @ low if shape[0] >= shape[1] else low @ basis.T


class GaLore(torch.optim.Optimizer):
    """AdamW whose param groups with ``galore=True`` keep their moments in a rank-``rank`` subspace."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, update_gap: int = 200, scale: float = 0.25, projector: Projector = svd_projector,
                 layerwise: bool = False, max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, galore=False, rank=rank, update_gap=update_gap, scale=scale)
        super().__init__(params, defaults)
        self.projector = projector
        self.owns_step = layerwise  # the training loop asks only for this attribute
        self.max_grad_norm = max_grad_norm
        self._mode: str | None = None
        self._norm_sq = torch.zeros(())
        self._coef = 1.0
        self._group = group_of_params(self)
        if layerwise:
            for g in self.param_groups:
                for p in g["params"]:
                    p.register_post_accumulate_grad_hook(lambda p: fused_hook(self, p, lambda p: self._update(p, self._group[id(p)], self._coef)))

    def train_step(self, micro: list[dict], step_loss) -> torch.Tensor:
        """Layer-wise mode: one step on ``micro`` (a single batch), the update fused into backward."""
        return fused_train_step(self, micro, step_loss, self.max_grad_norm, "layer-wise GaLore")

    @torch.no_grad()
    def step(self, closure=None):
        if self.owns_step:
            raise RuntimeError("layer-wise GaLore updates inside backward: call train_step(micro_batches, step_loss), not step()")
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._group = group_of_params(self)

    def _update(self, p: torch.Tensor, group: dict, coef: float = 1.0) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad.float()
        if coef != 1.0:  # only layer-wise clipping sets it, and that gradient is freed right after
            grad = grad.mul_(coef)
        state = self.state[p]
        low_rank = group["galore"] and p.ndim == 2
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        if low_rank and (int(state["step"]) % group["update_gap"] == 0):
            state["basis"] = self.projector(grad, group["rank"]).to(grad.dtype)
        r = project(grad, state["basis"]) if low_rank else grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(r)
            state["exp_avg_sq"] = torch.zeros_like(r)
        state["step"] += 1
        t = int(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(r, 1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        # Same operation order as torch's AdamW, so that P = I reproduces it to rounding; in place,
        # so a full-size unprojected matrix (the 49k x 576 embedding) costs one temporary, not three.
        denom = v.sqrt().div_((1 - beta2**t) ** 0.5).add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if low_rank:
            norm = (m / denom).div_(1 - beta1**t)
            p.add_(project_back(norm, state["basis"], p.shape).to(p.dtype), alpha=-group["lr"] * group["scale"])
        else:
            p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - beta1**t))


def galore_groups(params, model, rank: int) -> list[dict]:
    """2-D matrices inside the model's layers are projected; embeddings, head and vectors are not.

    A matrix smaller than the rank cannot be projected to it: that is a setting error, not a silent fallback.
    """
    names = named_parameters_of(model, params)
    skip = set()
    if model is not None:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None and getattr(module, "weight", None) is not None:
                skip.add(id(module.weight))
    low = [p for p in params if p.ndim == 2 and id(p) not in skip]
    for p in low:
        if rank > min(p.shape):
            raise ConfigError(f"optim.galore.rank = {rank} is larger than the smaller dimension of {names[id(p)]} {list(p.shape)}; "
                              f"use a rank ≤ {min(p.shape)}")
    rest = [p for p in params if not (p.ndim == 2 and id(p) not in skip)]
    groups = ({"params": low, "galore": True}, {"params": [p for p in rest if p.ndim >= 2], "galore": False},
              {"params": [p for p in rest if p.ndim < 2], "galore": False, "weight_decay": 0.0})  # biases and norms are not decayed
    return [g for g in groups if g["params"]]


@register_optimizer("galore")
def build_galore(params, config, model, objective) -> GaLore:
    g = config.galore
    return GaLore(galore_groups(params, model, g.rank), lr=config.lr, betas=config.betas, eps=config.eps,
                  weight_decay=config.weight_decay, rank=g.rank, update_gap=g.update_gap, scale=g.scale,
                  layerwise=g.layerwise, max_grad_norm=config.max_grad_norm)
