"""MeZO (Malladi et al., 2023) and Sparse MeZO (Liu et al., 2024): zeroth-order full fine-tuning.

One step, with z ~ N(0, I) over all trainable entries regenerated from a per-step seed (never stored)::

    L₊ = L(θ + ε z),   L₋ = L(θ − ε z)           two forward passes, no backward
    ĝ  = (L₊ − L₋) / (2ε)                         projected gradient (SPSA): ĝ ≈ zᵀ∇L
    θ  ← θ − lr · (ĝ · z + wd · θ)

The parameters are perturbed in place (+εz, −2εz, +εz) and z is drawn again for the update,
so memory is inference memory plus one parameter tensor's worth of noise at a time. Both passes
replay the same RNG state (the same dropout masks). Sparse MeZO multiplies z by a fixed mask of
the ``density`` share of each tensor's entries with the smallest |θ| (chosen once, at the start).
"""
from __future__ import annotations

import torch

from deltatune.optim import register_optimizer
from deltatune.utils.errors import ConfigError


def small_magnitude_mask(p: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``max(1, ⌊density·n⌋)`` entries of smallest |p| (ties at the threshold included)."""
    if density >= 1:
        return torch.ones_like(p, dtype=torch.bool)
    k = max(1, int(density * p.numel()))
    threshold = p.detach().abs().reshape(-1).float().kthvalue(k).values
    return p.detach().abs().float() <= threshold


class Mezo(torch.optim.Optimizer):
    owns_step = True

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, density: float | None = None, seed: int = 0):
        super().__init__(list(params), dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.seed = eps, seed
        self.steps = 0
        if density is not None:
            for p in self._params():
                self.state[p]["mask"] = small_magnitude_mask(p, density)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def noise(self, p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        mask = self.state[p].get("mask")
        return (z * mask if mask is not None else z).to(p.dtype)

    def _generator(self, seed: int) -> torch.Generator:
        device = self._params()[0].device
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """θ ← θ + scale · z(seed), one tensor of noise at a time."""
        gen = self._generator(seed)
        for p in self._params():
            p.add_(self.noise(p, gen), alpha=scale)

    @torch.no_grad()
    def estimate(self, loss_fn, seed: int) -> tuple[float, float, float]:
        """(ĝ, L₊, L₋) at the current θ for the direction z(seed); θ is restored (up to rounding)."""
        rng = torch.get_rng_state()
        offset = 0.0  # the perturbation currently applied, in units of z: undone even if a loss fails
        try:
            self.perturb(seed, self.eps)
            offset = self.eps
            plus = float(_scalar(loss_fn()))
            torch.set_rng_state(rng)
            self.perturb(seed, -2 * self.eps)
            offset = -self.eps
            minus = float(_scalar(loss_fn()))
        finally:
            if offset:
                self.perturb(seed, -offset)
        return (plus - minus) / (2 * self.eps), plus, minus

    @torch.no_grad()
    def apply(self, seed: int, projected_grad: float) -> None:
        gen = self._generator(seed)
        for group in self.param_groups:
            for p in group["params"]:
                z = self.noise(p, gen)  # drawn for every tensor, in the same order, so the stream stays aligned
                if group["weight_decay"] and p.ndim >= 2:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(z, alpha=-group["lr"] * projected_grad)

    def train_step(self, micro: list[dict], step_loss) -> torch.Tensor:
        """One SPSA step; ``step_loss(i, batch)`` → (the step's normalised loss, detached loss sum)."""
        sums = []

        def loss_fn():
            total, raw = torch.zeros((), dtype=torch.float64), torch.zeros(())
            for i, batch in enumerate(micro):
                loss, loss_sum = step_loss(i, batch)
                total = total + _scalar(loss)
                raw = raw + (loss if loss_sum is None else loss_sum).detach().float().cpu()
            sums.append(raw)
            return total

        seed = self.seed * 1_000_003 + self.steps
        self._opt_called = True  # this *is* the optimizer step (the lr scheduler checks that one happened)
        g, _, _ = self.estimate(loss_fn, seed)
        self.apply(seed, g)
        self.steps += 1
        return (sums[0] + sums[1]) / 2  # the mean of the two perturbed losses: MeZO never sees L(θ) itself

    def step(self, closure=None):
        raise RuntimeError("MeZO needs forward passes at perturbed weights: call train_step(micro_batches, step_loss), not step()")

    def state_dict(self):
        state = super().state_dict()
        state["mezo_steps"] = self.steps
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("mezo_steps", 0)
        super().load_state_dict(state_dict)


def _scalar(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.dtype.is_floating_point:
        raise ConfigError(f"optim.name mezo: the objective must return a scalar loss, got {type(value).__name__}"
                          + (f" of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else ""))
    return value


def _build(params, config, objective, density):
    if objective is None:
        raise ConfigError(f"optim.name {config.name}: MeZO needs an objective that returns a loss (it estimates the gradient from losses)")
    return Mezo(params, lr=config.lr, eps=config.mezo.eps, weight_decay=config.weight_decay, density=density)


@register_optimizer("mezo")
def build_mezo(params, config, model, objective) -> Mezo:
    return _build(params, config, objective, None)


@register_optimizer("sparse_mezo")
def build_sparse_mezo(params, config, model, objective) -> Mezo:
    return _build(params, config, objective, config.mezo.density)
