"""Compacter: bottleneck adapters whose projections are PHM layers (Karimi Mahabadi et al., 2021).

A PHM (parameterised hypercomplex multiplication) layer builds its weight ``W`` [out, in] as a
sum of ``n`` Kronecker products::

    W = Σᵢ Aᵢ ⊗ Bᵢ,      Aᵢ [n, n]  "slow" weights (the rule), shared by every adapter of the delta
                          Bᵢ = sᵢ tᵢ [out/n, in/n], sᵢ [out/n, k], tᵢ [k, in/n]  "fast" low-rank weights
    y = x Wᵀ + b

so a layer holds ``k·(in + out) + out`` own parameters instead of ``in·out + out``. Compacter puts
two such layers (down → activation → up) where a bottleneck adapter goes and reuses
:class:`~deltatune.methods.bottleneck.BottleneckBranch` for placement and scaling::

    sequential:  y = h + s · up(act(down(h)))           parallel:  y = h + s · up(act(down(x)))

``variant``: ``compacter`` adapts after attention and FFN (Houlsby placement, llama ``o_proj`` +
``down_proj``, BERT both ``output.dense``); ``compacter++`` only after the FFN (llama
``down_proj``, BERT ``layer.N.output.dense``). The up layer's sᵢ and bias start at zero, so
``W_up = 0`` and the model is unchanged at attach time. Not mergeable (the adapter is non-linear).

The shared rules (one for down, one for up layers) are registered on the first branch of the
delta only — other branches hold a reference — so they are trained, counted and saved once
(``<first module>.phm_rule_down`` / ``phm_rule_up`` in the file).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.core.registry import register
from deltatune.methods.bottleneck import ACTIVATIONS, BottleneckBranch, BottleneckConfig, block_features
from deltatune.utils.errors import TargetError

TARGETS = {
    "compacter": {"llama": ["o_proj", "down_proj"], "bert": ["output.dense"]},
    "compacter++": {"llama": ["down_proj"], "bert": [r"re:.*\.layer\.\d+\.output\.dense"]},
}


class CompacterConfig(BottleneckConfig):
    """Bottleneck fields (``size``, ``placement``, ``scaling``, ``activation``) plus ``variant``
    (compacter | compacter++: default targets), ``phm_dim`` n (number of Kronecker products; must
    divide the module's features and ``size``), ``phm_rank`` k of the fast weights and
    ``shared_phm_rule`` (share the slow weights across all adapters, as in the paper)."""

    method: Literal["compacter"] = "compacter"  # type: ignore[assignment]
    variant: Literal["compacter", "compacter++"] = "compacter"
    size: int = Field(32, gt=0)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    phm_dim: int = Field(4, gt=0)
    phm_rank: int = Field(1, gt=0)
    shared_phm_rule: bool = True


def phm_weight(rule: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Σᵢ kron(rule[i], left[i] @ right[i])`` → [n·p, n·q].

    rule [n, n, n], left [n, p, k], right [n, k, q]. Plain PyTorch equivalent:
    ``sum(torch.kron(rule[i], left[i] @ right[i]) for i in range(n))``.
    """
    n, p, q = rule.shape[0], left.shape[1], right.shape[2]
    fast = torch.bmm(left, right)  # [n, p, q]
    return torch.einsum("iac,ibd->abcd", rule, fast).reshape(n * p, n * q)


class RuleHolder(nn.Module):
    """The slow weights Aᵢ of the down and up layers, [n, n, n] each."""

    def __init__(self, n: int, dtype: torch.dtype):
        super().__init__()
        # var(W) = n · var(A) · var(s t); with var(A) = 1/n the fast weights set the scale.
        self.phm_rule_down = nn.Parameter(torch.randn(n, n, n, dtype=dtype) / math.sqrt(n))
        self.phm_rule_up = nn.Parameter(torch.randn(n, n, n, dtype=dtype) / math.sqrt(n))


class PHMLinear(nn.Module):
    """A linear layer whose weight is a PHM sum of Kronecker products (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int, rules: RuleHolder, which: str, zero: bool, dtype: torch.dtype):
        super().__init__()
        p, q = out_features // n, in_features // n
        # var(s t) = k·σ⁴ = 1/in: a Kaiming-like scale for the composed weight.
        std = (rank * in_features) ** -0.25
        self.phm_left = nn.Parameter(torch.zeros(n, p, rank, dtype=dtype) if zero else torch.randn(n, p, rank, dtype=dtype) * std)
        self.phm_right = nn.Parameter(torch.randn(n, rank, q, dtype=dtype) * std)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        # A plain attribute, not a submodule: the rule is registered (saved, counted) on one branch only.
        self.__dict__["rules"] = rules
        self.which = which

    @property
    def rule(self) -> torch.Tensor:
        return getattr(self.rules, f"phm_rule_{self.which}")

    def weight_matrix(self) -> torch.Tensor:
        return phm_weight(self.rule, self.phm_left, self.phm_right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)


class CompacterBranch(BottleneckBranch):
    def __init__(self, module_name: str, d_in: int, d_out: int, config: CompacterConfig, rules: RuleHolder, owns_rules: bool, dtype: torch.dtype):
        nn.Module.__init__(self)  # BottleneckBranch's own __init__ would build nn.Linear projections
        self.parallel = config.placement == "parallel"
        z = d_in if self.parallel else d_out
        n = config.phm_dim
        for what, size in (("input" if self.parallel else "output", z), ("output", d_out), ("size", config.size)):
            if size % n:
                raise TargetError(f"compacter: phm_dim={n} must divide the {what} features of {module_name!r} ({size}); pick a phm_dim that divides {size}")
        self.adapter_down = PHMLinear(z, config.size, n, config.phm_rank, rules, "down", zero=False, dtype=dtype)
        self.adapter_up = PHMLinear(config.size, d_out, n, config.phm_rank, rules, "up", zero=True, dtype=dtype)
        self.act = ACTIVATIONS[config.activation]()
        self.scaling = config.scaling
        if owns_rules:
            self.rules = rules  # registered here only: trained, counted and saved once per delta


@register
class CompacterMethod(DeltaMethod):
    name = "compacter"
    config_class = CompacterConfig
    capabilities = Capabilities(mergeable=False)
    target_kind = "nn.Linear or blocks containing one"
    branch_keys = tuple(f"adapter_{p}.{k}" for p in ("down", "up") for k in ("phm_left", "phm_right", "bias")) + (
        "rules.phm_rule_down", "rules.phm_rule_up")

    def __init__(self):
        self._shared: tuple[CompacterConfig, RuleHolder] | None = None

    def can_wrap(self, module: nn.Module) -> bool:
        return any(isinstance(m, nn.Linear) for m in module.modules())

    def resolve_config(self, model: nn.Module, config: CompacterConfig) -> CompacterConfig:
        # Always a new object: one attach = one config object = one set of shared rules (see make_branch).
        if config.targets is not None:
            return config.model_copy()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = TARGETS[config.variant]
        if model_type not in table:
            raise TargetError(f"compacter: no default targets for model type {model_type!r}; set targets (e.g. the FFN output layer)")
        return config.model_copy(update={"targets": table[model_type]})

    def make_branch(self, module_name: str, module: nn.Module, config: CompacterConfig) -> CompacterBranch:
        d_in, d_out = block_features(module)
        dtype = next(module.parameters()).dtype
        # attach() calls make_branch for all targets of one delta with the same config object
        # (resolve_config made it): the first call creates the shared rules, later ones reuse them.
        if config.shared_phm_rule and self._shared is not None and self._shared[0] is config:
            return CompacterBranch(module_name, d_in, d_out, config, self._shared[1], owns_rules=False, dtype=dtype)
        rules = RuleHolder(config.phm_dim, dtype)
        self._shared = (config, rules) if config.shared_phm_rule else None
        return CompacterBranch(module_name, d_in, d_out, config, rules, owns_rules=True, dtype=dtype)
