"""LOMO and AdaLomo (Lv et al., 2023): the update fused into backward.

A hook on every parameter (``register_post_accumulate_grad_hook``) fires as soon as that
parameter's gradient is complete, applies the update and frees the gradient, so at no time do
all gradients exist at once: peak memory ≈ weights + activations + one layer's gradients.

LOMO is SGD: ``θ ← θ·(1 − lr·wd) − lr · c · g``. Clipping needs the *global* gradient norm
before the first update, which a fused update cannot know, so with ``max_grad_norm`` set a step
runs two passes (as LOMO does): pass 1 only accumulates ‖g‖² and frees each gradient, pass 2
updates with ``c = min(1, max_norm / (‖g‖ + 1e-6))`` — exactly ``clip_grad_norm_`` then SGD.
Both passes see the same dropout masks (the RNG state is replayed).

AdaLomo adds Adafactor's factored second moment (row and column means of g² for a matrix,
β₂ₜ = 1 − t^−0.8) and grouped update normalisation, which replaces clipping (one pass)::

    v = r cᵀ / mean(r);  u = g / √v;  u ← u / max(1, RMS(u));  θ ← θ − lr · max(1e-3, RMS(θ)) · u

Gradient accumulation is impossible with a fused update (each micro-batch would update); a
recipe with ``train.grad_accum > 1`` fails before its first step.
"""
from __future__ import annotations

import torch

from deltatune.optim import register_optimizer
from deltatune.utils.errors import ConfigError


class Lomo(torch.optim.Optimizer):
    owns_step = True

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, max_grad_norm: float | None = None, adaptive: bool = False):
        super().__init__(list(params), dict(lr=lr, weight_decay=weight_decay))
        self.max_grad_norm = None if adaptive else max_grad_norm
        self.adaptive = adaptive
        self._mode: str | None = None
        self._norm_sq = torch.zeros(())
        self._coef = 1.0
        self._group = group_of_params(self)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for g in self.param_groups for p in g["params"]]

    def _hook(self, p: torch.Tensor) -> None:
        fused_hook(self, p, lambda p: (self._adalomo_update if self.adaptive else self._sgd_update)(p, p.grad, self._group[id(p)]))

    def _sgd_update(self, p, grad, group) -> None:
        if group["weight_decay"] and p.ndim >= 2:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(grad.to(p.dtype), alpha=-group["lr"] * self._coef)

    def _adalomo_update(self, p, grad, group) -> None:
        state = self.state[p]
        g = grad.float()
        state["step"] = state.get("step", 0) + 1
        beta2 = 1 - state["step"] ** -0.8
        sq = g * g + 1e-30
        if p.ndim >= 2:
            sq2 = sq.reshape(p.shape[0], -1)
            if "row" not in state:
                state["row"] = torch.zeros(sq2.shape[0], device=p.device)
                state["col"] = torch.zeros(sq2.shape[1], device=p.device)
            state["row"].lerp_(sq2.mean(dim=1), 1 - beta2)
            state["col"].lerp_(sq2.mean(dim=0), 1 - beta2)
            v = (torch.outer(state["row"], state["col"]) / state["row"].mean()).reshape(p.shape)
        else:
            if "v" not in state:
                state["v"] = torch.zeros_like(g)
            state["v"].lerp_(sq, 1 - beta2)
            v = state["v"]
        u = g / v.sqrt()
        u /= max(1.0, float(u.pow(2).mean().sqrt()))
        scale = max(1e-3, float(p.detach().float().pow(2).mean().sqrt()))
        if group["weight_decay"] and p.ndim >= 2:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(u.to(p.dtype), alpha=-group["lr"] * scale)

    def train_step(self, micro: list[dict], step_loss) -> torch.Tensor:
        """One step on ``micro`` (a single batch); ``step_loss(i, batch)`` → (loss to differentiate, detached loss sum)."""
        return fused_train_step(self, micro, step_loss, self.max_grad_norm, "LOMO/AdaLomo")

    def step(self, closure=None):
        raise RuntimeError("LOMO updates inside backward: call train_step(micro_batches, step_loss), not step()")

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._group = group_of_params(self)


def group_of_params(opt: torch.optim.Optimizer) -> dict[int, dict]:
    """id(param) → its param group, for hooks that update one parameter. ``load_state_dict`` replaces
    the group dicts (the schedule then sets the lr in the new ones), so a hook's map is rebuilt there."""
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def fused_hook(opt, p: torch.Tensor, apply) -> None:
    """The per-parameter hook of an optimizer fused into backward (``opt._mode``: None, "norm" or "update").

    "norm" only adds ‖g‖² (clipping's first pass); "update" runs ``apply(p)`` with ``p.grad`` set.
    Either way the gradient is freed at once, so at most one parameter's gradient exists at a time.
    """
    if opt._mode is None:  # a backward outside train_step (e.g. a user's own): leave the gradient alone
        return
    if opt._mode == "norm":
        opt._norm_sq += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()  # no gradient-sized temporary
    else:
        with torch.no_grad():
            apply(p)
    p.grad = None


def fused_train_step(opt, micro: list[dict], step_loss, max_grad_norm: float | None, name: str) -> torch.Tensor:
    """One step of an optimizer whose hooks (:func:`fused_hook`) update inside backward.

    With ``max_grad_norm`` a first backward only measures the global norm and a second (same RNG
    state, so the same dropout masks) updates with ``opt._coef = min(1, max_norm / (‖g‖ + 1e-6))``.
    """
    if len(micro) != 1:
        raise ConfigError(f"train.grad_accum = {len(micro)}: {name} update inside backward and cannot accumulate gradients; "
                          "use grad_accum 1 and a larger batch_size")
    batch = micro[0]
    opt._coef = 1.0
    opt._opt_called = True  # this *is* the optimizer step (the lr scheduler checks that one happened)
    try:
        if max_grad_norm:
            rng = torch.get_rng_state()
            opt._mode, opt._norm_sq = "norm", torch.zeros(())
            loss, _ = step_loss(0, batch)
            loss.backward()
            norm = float(opt._norm_sq.sqrt())
            opt._coef = min(1.0, max_grad_norm / (norm + 1e-6))
            torch.set_rng_state(rng)
        opt._mode = "update"
        loss, loss_sum = step_loss(0, batch)
        loss.backward()
    finally:
        opt._mode = None
    return loss_sum


def _check_params(params, name):
    if not params:
        raise ConfigError(f"optim.name {name}: no trainable parameters")


@register_optimizer("lomo")
def build_lomo(params, config, model, objective) -> Lomo:
    _check_params(params, "lomo")
    return Lomo(params, lr=config.lr, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)


@register_optimizer("adalomo")
def build_adalomo(params, config, model, objective) -> Lomo:
    _check_params(params, "adalomo")
    return Lomo(params, lr=config.lr, weight_decay=config.weight_decay, adaptive=True)
