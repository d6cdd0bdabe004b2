"""PiSSA: LoRA initialised from the principal singular directions of W (Meng et al., 2024).

With ``W = U S Vᵀ`` (``W`` [out, in]) and ``s`` the LoRA scale, PiSSA starts from::

    A₀ = diag(√(S_r / s)) V_rᵀ        [r, in]
    B₀ = U_r diag(√(S_r / s))         [out, r]      so  s · B₀ A₀ = U_r S_r V_rᵀ (the top-r part of W)

and trains A, B on top of the frozen residual ``W_res = W − s · B₀ A₀``: the adapter starts on
the directions that matter most, not at zero. (KaSA, CorDA and LIFT pick other directions; the
mechanics are the same.) This is exactly PEFT's ``init_lora_weights="pissa"``.

The residual is not written into the base weight: the branch keeps A₀, B₀ as frozen buffers and
computes ``y = W x + s · (B A x − B₀ A₀ x) = W_res x + s · B A x``. Same function, same
gradients for A and B, but the base stays untouched, so ``disable()``, other deltas on the same
base and ``unload()`` see the original W. The update is evaluated as ``(B − B₀) A x + B₀ (A − A₀) x``,
exactly zero at attach time, so the model is unchanged bit for bit.

Files hold A and B (rank r) with PEFT's ``init_lora_weights: "pissa"``; loading (deltatune or
PEFT) recomputes A₀, B₀ from the base weights, which must be the ones the delta was trained on.
:func:`pissa_to_lora` turns the delta into a plain rank-2r LoRA that needs no SVD to load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.lora import LoraBranch, LoraConfig
from deltatune.utils.errors import TargetError


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀ [r, in], B₀ [out, r])`` with ``scaling · B₀ @ A₀`` = the rank-r truncated SVD of ``weight``.

    Plain PyTorch, computed in fp32 as PEFT does (its ``pissa_init``), so both give the same factors.
    """
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


class PissaLoraBranch(LoraBranch):
    def __init__(self, module_name: str, weight: torch.Tensor, config: LoraConfig):
        out_features, in_features = weight.shape
        if config.r > min(out_features, in_features):
            raise TargetError(f"lora init pissa: r={config.r} exceeds the rank of {module_name!r} (weight {list(weight.shape)}); use r <= {min(weight.shape)}")
        super().__init__(in_features, out_features, config)
        a0, b0 = pissa_factors(weight, config.r, config.scaling)
        with torch.no_grad():
            self.lora_A.weight.copy_(a0)
            self.lora_B.weight.copy_(b0)
        # Not saved: they are a function of the base weights and are recomputed at load time.
        self.register_buffer("pissa_A0", a0, persistent=False)
        self.register_buffer("pissa_B0", b0, persistent=False)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.training and isinstance(self.dropout, nn.Dropout):
            update = F.linear(F.linear(self.dropout(x), a), b) - F.linear(F.linear(x, self.pissa_A0), self.pissa_B0)
        else:
            # B A − B₀ A₀ = (B − B₀) A + B₀ (A − A₀): products of exact zeros at init, so the output is
            # unchanged bit for bit (two separately computed products need not round alike).
            update = F.linear(F.linear(x, a), b - self.pissa_B0) + F.linear(F.linear(x, a - self.pissa_A0), self.pissa_B0)
        return base_out.add_(update.to(base_out.dtype), alpha=self.scaling)

    def delta_weight(self, base) -> torch.Tensor:
        """ΔW = s · (B A − B₀ A₀) = s · ((B − B₀) A + B₀ (A − A₀)), shape [out, in]: the change from the original W."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return ((b - self.pissa_B0) @ a + self.pissa_B0 @ (a - self.pissa_A0)) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s·(B A − B₀ A₀) = [s·B, −s·B₀] [A; A₀]: rank 2r, A [2r, in], B_s [out, 2r]."""
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        return torch.cat([a, self.pissa_A0]), torch.cat([b, -self.pissa_B0], dim=1) * self.scaling


@torch.no_grad()
def pissa_to_lora(model, name: str = "default", new_name: str = "lora") -> str:
    """Attach ``new_name``: a plain LoRA delta (rank 2r) equal to PiSSA delta ``name`` on the original base.

    ``s·(B A − B₀ A₀) = s·[B, −B₀] [A; A₀]``, with alpha doubled (√2 × with rslora) so the scale of
    rank 2r equals the scale of rank r: PEFT's ``path_initial_model_for_weight_conversion``. The
    result no longer needs the SVD at load time (nor the same base bits to reproduce it); it becomes
    the active and trainable delta, ready for ``save_delta``. Returns ``new_name``.
    """
    from deltatune.core.inject import iter_wrappers
    from deltatune.utils.errors import ConfigError

    config = model.delta_configs.get(name)
    if config is None or config.method != "lora" or config.init != "pissa":
        raise ConfigError(f"pissa_to_lora: delta {name!r} is not a LoRA delta with init: pissa")
    pissa = {m: w.deltas[name] for m, w in iter_wrappers(model.base_model) if name in w.deltas and isinstance(w.deltas[name], PissaLoraBranch)}
    alpha = config.alpha * (2**0.5 if config.rslora else 2.0)
    model.attach(config.model_copy(update={"init": "kaiming", "r": 2 * config.r, "alpha": alpha, "targets": list(pissa), "exclude": []}), name=new_name)
    old, new = model.delta_state_dict(name), model.delta_state_dict(new_name)
    for module, branch in pissa.items():
        new[f"{module}.lora_A.weight"].copy_(torch.cat([branch.lora_A.weight, branch.pissa_A0]))
        new[f"{module}.lora_B.weight"].copy_(torch.cat([branch.lora_B.weight, -branch.pissa_B0], dim=1))
    for key, value in old.items():  # trained modules_to_save copies carry over as they are
        if key not in new or key.endswith(("lora_A.weight", "lora_B.weight")):
            continue
        new[key].copy_(value)
    return new_name
