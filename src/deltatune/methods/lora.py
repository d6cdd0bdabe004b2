"""LoRA: a low-rank update of a linear layer (Hu et al., 2021).

For ``W ∈ R^{out×in}`` LoRA learns ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` and computes::

    y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ,      s = alpha / r   (rank-stabilised: alpha / √r)

so ``ΔW = s · B A``. With the default init (A random, B = 0) the model is unchanged at attach
time. Files use PEFT's names: ``<module>.lora_A.weight`` [r, in], ``<module>.lora_B.weight`` [out, r].

``rank_pattern`` gives single modules another rank ``r_m`` (A [r_m, in], B [out, r_m]) while the
scale stays ``s`` for every module; PEFT files get PEFT's ``rank_pattern`` plus the
``alpha_pattern`` that keeps PEFT's per-module scale equal to ``s``.

Options live in their own modules: ``init: pissa`` (A, B from the top-r SVD of W, see
:mod:`deltatune.methods.lora_init`), ``rank_allocation: incremental`` (IncreLoRA-style rank
growth under a budget, see :mod:`deltatune.methods.lora_rank`); PEFT AdaLoRA files load as LoRA
with per-module ranks (:mod:`deltatune.methods.lora_adalora`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.utils.errors import DeltaFileError, ShapeMismatchError


class LoraConfig(DeltaConfig):
    """``r``: rank; ``alpha``: scale numerator; ``dropout`` on the LoRA input only;
    ``rslora``: scale alpha/√r instead of alpha/r; ``init``: ``kaiming`` (A Kaiming-uniform as in
    PEFT, B zero), ``gaussian`` (A ~ N(0, 1/r), B zero) or ``pissa`` (principal singular vectors).

    ``rank_allocation: incremental`` pre-allocates rank ``r`` per module, starts with ``initial_r``
    active ranks and every ``grow_every`` steps gives one more rank to the ``grow_count`` modules
    with the highest importance, until the active ranks of all modules sum to ``total_r``
    (default: half of the pre-allocated ranks). ``importance_beta``: EMA factor of the score.

    ``rank_pattern``: ``{module pattern: rank}`` (targets syntax; the first matching pattern wins),
    the rank of the matched modules instead of ``r``. The scale stays alpha/r (alpha/√r) everywhere."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    bias: Literal["none"] = "none"
    rank_allocation: Literal["fixed", "incremental"] = "fixed"
    initial_r: int = Field(1, gt=0)
    total_r: int | None = Field(None, gt=0)
    grow_every: int = Field(10, gt=0)
    grow_count: int = Field(1, gt=0)
    importance_beta: float = Field(0.85, ge=0.0, lt=1.0)
    rank_pattern: dict[str, int] = {}

    @model_validator(mode="after")
    def _check_options(self) -> "LoraConfig":
        # A saved config lists every field, so only a non-default value counts as "set".
        incremental_only = [k for k in ("initial_r", "total_r", "grow_every", "grow_count", "importance_beta")
                            if getattr(self, k) != type(self).model_fields[k].default]
        if self.rank_allocation == "fixed" and incremental_only:
            raise ValueError(f"{sorted(incremental_only)[0]} is only used with rank_allocation: incremental")
        if self.rank_allocation == "incremental":
            if self.initial_r > self.r:
                raise ValueError(f"initial_r ({self.initial_r}) must be at most r ({self.r}), the rank pre-allocated per module")
            if self.init == "pissa":
                raise ValueError("init: pissa fixes the rank to the top-r singular directions; use it with rank_allocation: fixed")
        bad = {k: v for k, v in self.rank_pattern.items() if not (isinstance(v, int) and v > 0)}
        if bad:
            key = next(iter(bad))
            raise ValueError(f"rank_pattern[{key!r}] = {bad[key]!r}: ranks must be positive integers (leave a module out of targets to give it none)")
        if self.rank_pattern and (self.rank_allocation != "fixed" or self.init == "pissa"):
            raise ValueError("rank_pattern is only supported with init: kaiming/gaussian and rank_allocation: fixed")
        return self

    def rank_for(self, module: str) -> int:
        """The rank of ``module``: the first ``rank_pattern`` entry matching it, else ``r``."""
        from deltatune.core.targets import matches

        return next((rank for pattern, rank in self.rank_pattern.items() if matches(pattern, module)), self.r)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoraBranch(DeltaBranch):
    def __init__(self, in_features: int, out_features: int, config: LoraConfig, rank: int | None = None):
        super().__init__()
        rank = config.r if rank is None else rank
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Run the low-rank path in the LoRA weights' dtype (fp32 under a bf16 base, say) and
        # add in the base output's dtype.
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))).to(base_out.dtype)
        # base_out is a fresh tensor that no backward formula keeps, so the scaled add can write
        # into it: one pass over [tokens, out] instead of three (scale, add, new tensor).
        return base_out.add_(update, alpha=self.scaling)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW = s · B @ A, shape [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], s·B [out, r])."""
        return self.lora_A.weight.detach(), self.lora_B.weight.detach() * self.scaling


@register
class LoraMethod(DeltaMethod):
    name = "lora"
    config_class = LoraConfig
    capabilities = Capabilities(mergeable=True, linear_delta=True, low_rank_factors=True)
    default_targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "*": "all-linear"}
    branch_keys = ("lora_A.weight", "lora_B.weight", "lora_rank_mask")
    peft_type = "LORA"
    # Other PEFT types whose files load as LoRA (from_peft_config / from_peft_tensors convert them).
    peft_imports = ("ADALORA",)

    def resolve_config(self, model: nn.Module, config: LoraConfig) -> LoraConfig:
        if config.rank_allocation == "incremental":
            from deltatune.methods.lora_rank import resolve_budget

            return resolve_budget(self, model, config)
        return config

    def make_branch(self, module_name: str, module: nn.Module, config: LoraConfig) -> LoraBranch:
        # Half-precision bases keep their LoRA weights in fp32: tiny updates to bf16 weights vanish.
        dtype = torch.float32 if module.weight.dtype in (torch.float16, torch.bfloat16) else module.weight.dtype
        if config.init == "pissa":
            from deltatune.methods.lora_init import PissaLoraBranch

            return PissaLoraBranch(module_name, module.weight, config).to(dtype=dtype)
        if config.rank_allocation == "incremental":
            from deltatune.methods.lora_rank import IncrementalLoraBranch

            return IncrementalLoraBranch(module.in_features, module.out_features, config).to(dtype=dtype)
        return LoraBranch(module.in_features, module.out_features, config, config.rank_for(module_name)).to(dtype=dtype)

    def on_train_step(self, branches: dict[str, DeltaBranch], config: LoraConfig, step: int) -> None:
        if config.rank_allocation == "incremental":
            from deltatune.methods.lora_rank import grow_ranks

            grow_ranks(branches, config, step)

    def to_peft_config(self, config: LoraConfig, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        # PEFT scales a module of rank r_m by alpha_m / r_m (alpha_m / √r_m): alpha_m keeps it at ours.
        ranks = {name: config.rank_for(name) for name in target_names if config.rank_for(name) != config.r}
        alphas = {name: config.alpha * (math.sqrt(r_m / config.r) if config.rslora else r_m / config.r) for name, r_m in ranks.items()}
        return {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "target_modules": target_patterns,
            "bias": "none",
            "fan_in_fan_out": False,
            # PEFT re-runs the SVD of the (original) base weights when it loads a "pissa" adapter.
            "init_lora_weights": "pissa" if config.init == "pissa" else True,
            "use_dora": False,
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "modules_to_save": config.modules_to_save or None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> LoraConfig:
        if peft_config.get("peft_type") == "ADALORA":
            from deltatune.methods.lora_adalora import adalora_lora_config

            return adalora_lora_config(peft_config, source)
        unsupported = {
            "use_dora": (False, None),
            "fan_in_fan_out": (False, None),
            "bias": ("none", None),
            "layers_to_transform": (None, []),
        }
        for key, allowed in unsupported.items():
            if key in peft_config and peft_config[key] not in allowed:
                raise DeltaFileError(f"{source}: PEFT LoRA option {key}={peft_config[key]!r} is not supported by deltatune yet")
        init = peft_config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "pissa"):
            raise DeltaFileError(f"{source}: PEFT LoRA option init_lora_weights={init!r} is not supported by deltatune (supported: true, gaussian, pissa)")
        targets = peft_config.get("target_modules")
        ranks, _ = _peft_patterns(peft_config, source)
        return LoraConfig(
            rank_pattern={_peft_key_pattern(key): rank for key, rank in ranks.items()},
            init="pissa" if init == "pissa" else "kaiming",
            r=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout", 0.0) or 0.0),
            rslora=bool(peft_config.get("use_rslora", False)),
            targets=targets if isinstance(targets, list) or targets is None else ("re:" + targets if targets != "all-linear" else targets),
            modules_to_save=list(peft_config.get("modules_to_save") or []),
        )

    def from_peft_tensors(self, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A PEFT file's tensors (keys without the file prefix) → this method's; LoRA's are used as they are."""
        if peft_config.get("peft_type") == "ADALORA":
            from deltatune.methods.lora_adalora import adalora_lora_tensors

            return adalora_lora_tensors(peft_config, tensors, source)
        if not self.converts_peft_tensors(peft_config):
            return tensors
        return _fold_peft_scales(peft_config, tensors, source)

    def converts_peft_tensors(self, peft_config: dict[str, Any]) -> bool:
        if peft_config.get("peft_type") == "ADALORA":
            return True
        ranks, alphas = _peft_patterns(peft_config, "adapter_config.json")
        return bool(ranks or alphas)


def _peft_patterns(peft_config: dict[str, Any], source: str) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's ``rank_pattern`` {key: rank} and ``alpha_pattern`` {key: alpha}, validated."""
    out = []
    for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = peft_config.get(field) or {}
        if not isinstance(pattern, dict):
            raise DeltaFileError(f"{source}: PEFT LoRA {field} must be a mapping of module patterns to numbers, got {type(pattern).__name__}")
        for key, value in pattern.items():
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if not ok or isinstance(value, bool) or value <= 0:
                raise DeltaFileError(f"{source}: PEFT LoRA {field}[{key!r}] = {value!r}; expected a positive {'integer' if kind is int else 'number'}")
        out.append({str(k): kind(v) for k, v in pattern.items()})
    return out[0], out[1]


def _peft_key_pattern(key: str) -> str:
    r"""PEFT matches a pattern key ``k`` against a module name with ``re.match(rf"(.*\.)?({k})$", name)``
    (``peft.utils.other.get_pattern_key``); the same rule in targets syntax."""
    return rf"re:(.*\.)?({key})"


@torch.no_grad()
def _fold_peft_scales(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """PEFT scales module ``m`` by ``alpha_m / r_m`` (``alpha_m / √r_m`` with rsLoRA), ``alpha_m`` from
    ``alpha_pattern`` (else ``lora_alpha``) and ``r_m`` its rank; deltatune by one ``alpha / r`` for all.
    Folding the ratio into B gives the same function: ``s · B' A = s_m · B A``."""

    _, alphas = _peft_patterns(peft_config, source)
    r, alpha = int(peft_config["r"]), float(peft_config.get("lora_alpha", 8))
    rslora = bool(peft_config.get("use_rslora", False))
    root = math.sqrt if rslora else (lambda x: x)
    scale = alpha / root(r)
    out = dict(tensors)
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = f"{module}.lora_B.weight"
        if b_key not in tensors:
            raise ShapeMismatchError(f"{source}: LoRA module {module!r} has lora_A but no lora_B tensor")
        alpha_m = next((v for k, v in alphas.items() if re.match(rf"(.*\.)?({k})$", module)), alpha)
        out[b_key] = tensors[b_key] * ((alpha_m / root(a.shape[0])) / scale)
    return out
