"""LoFiT: localized fine-tuning on representations (Yin et al., 2024).

Attention heads' outputs ``z = [z₁ … z_H]`` (each [d_head]) are concatenated and fed to the
attention output projection (llama ``o_proj``, BERT ``attention.output.dense``). LoFiT edits them
there, so the branch rewrites that module's *input*; two stages:

    stage "scale":  zₕ ← (1 + aₕ) ⊙ zₕ      aₕ ∈ R^{d_head} for every head, init 0,
                    trained with the penalty  l1 · Σ |aₕ|  (``regularization()``; the trainer adds it)
    stage "bias":   zₕ ← zₕ + vₕ            vₕ ∈ R^{d_head} only for the selected heads, init 0

Workflow: attach ``{"method": "lofit"}`` (stage scale), train, call :func:`select_heads` to keep
the top ``top_percent`` % of heads by ‖aₕ‖₂ (over all layers), detach it, attach the returned
stage-"bias" config to the original base and train that. Both stages start at the identity, so the
model is unchanged at attach time.

Both merge exactly into the output projection ``y = W z + b``: the scale as ``W ← W diag(1 + a)``
(refused if some 1 + a is 0), the bias as ``b ← b + W v``. Llama's ``o_proj`` has no bias: while
merged it gets one (``W v``) and loses it again on unmerge, so the unmerged model's keys never
change. Files: ``<module>.lofit_scale`` [H, d_head] or ``<module>.lofit_bias`` [K, d_head] with
the head indices in the config (``heads``). PEFT has no LoFiT.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.inject import iter_wrappers
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import register
from deltatune.utils.errors import ConfigError, DeltatuneError, TargetError

DEFAULT_TARGETS = {"llama": ["o_proj"], "bert": ["attention.output.dense"]}


class LofitConfig(DeltaConfig):
    """``stage``: scale | bias; ``l1``: weight of the L1 penalty on the head scales (stage scale);
    ``heads``: module name → head indices that get a bias (stage bias; default: every head);
    ``num_heads``: heads per attention layer (default: the model config's num_attention_heads)."""

    method: Literal["lofit"] = "lofit"
    stage: Literal["scale", "bias"] = "scale"
    l1: float = Field(1e-3, ge=0.0)
    heads: dict[str, list[int]] | None = None
    num_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LofitConfig":
        if self.heads is not None and self.stage != "bias":
            raise ValueError("heads is only used with stage: bias (the scale stage trains every head)")
        for module, idx in (self.heads or {}).items():
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0:
                raise ValueError(f"heads[{module!r}] must be a non-empty list of distinct head indices, got {idx}")
        return self


class LofitBranch(DeltaBranch):
    transforms_input = True

    def __init__(self, num_heads: int, head_dim: int, stage: str, heads: list[int] | None, l1: float, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.head_dim, self.stage, self.l1 = num_heads, head_dim, stage, l1
        self._added_bias = False
        if stage == "scale":
            self.lofit_scale = nn.Parameter(torch.zeros(num_heads, head_dim, dtype=dtype))
        else:
            self.register_buffer("heads", torch.tensor(heads, dtype=torch.long), persistent=False)
            self.lofit_bias = nn.Parameter(torch.zeros(len(heads), head_dim, dtype=dtype))

    def offset(self) -> torch.Tensor:
        """The bias stage's offset for the whole concatenated input, [H · d_head] (zero on unselected heads)."""
        full = self.lofit_bias.new_zeros(self.num_heads, self.head_dim).index_copy(0, self.heads, self.lofit_bias)
        return full.reshape(-1)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        # Heads are contiguous blocks of the last dimension, so [H, d_head] flattened lines up with it.
        if self.stage == "scale":
            return x * (1 + self.lofit_scale.reshape(-1)).to(x.dtype)
        return x + self.offset().to(x.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out

    def regularization(self) -> torch.Tensor | None:
        return self.l1 * self.lofit_scale.abs().sum() if self.stage == "scale" and self.l1 > 0 else None

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if self.stage == "scale":
            factor = 1 + self.lofit_scale.reshape(-1)
            if (factor == 0).any():  # checked before W changes: a zero column cannot be divided back
                raise DeltatuneError("a LoFiT head scale 1 + a is exactly 0: merging would lose the weights it scales")
            base.weight.data *= factor.to(base.weight.dtype)
            return
        shift = base.weight.data @ self.offset().to(base.weight.dtype)
        if base.bias is None:
            base.bias = nn.Parameter(shift, requires_grad=False)
            self._added_bias = True
        else:
            base.bias.data += shift
            self._added_bias = False

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.stage == "scale":
            base.weight.data /= (1 + self.lofit_scale.reshape(-1)).to(base.weight.dtype)
        elif self._added_bias:
            base.bias = None
        else:
            base.bias.data -= base.weight.data @ self.offset().to(base.weight.dtype)


@register
class LofitMethod(DeltaMethod):
    name = "lofit"
    config_class = LofitConfig
    capabilities = Capabilities(mergeable=True, linear_delta=False)
    default_targets = {**DEFAULT_TARGETS, "*": "o_proj"}
    branch_keys = ("lofit_scale", "lofit_bias")

    def resolve_config(self, model: nn.Module, config: LofitConfig) -> LofitConfig:
        update = {}
        if config.num_heads is None:
            heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
            if heads is None:
                raise ConfigError("lofit: the model config has no num_attention_heads; set num_heads")
            update["num_heads"] = int(heads)
        if config.targets is None and config.heads is not None:
            update["targets"] = list(config.heads)
        return config.model_copy(update=update) if update else config

    def make_branch(self, module_name: str, module: nn.Module, config: LofitConfig) -> LofitBranch:
        h = config.num_heads
        if module.in_features % h:
            raise TargetError(f"lofit: {module_name!r} has {module.in_features} input features, not a multiple of num_heads={h}; target the attention output projection")
        heads = None
        if config.stage == "bias":
            if config.heads is not None and module_name not in config.heads:
                raise TargetError(f"lofit: target {module_name!r} has no entry in heads (modules with heads: {sorted(config.heads)})")
            heads = list(range(h)) if config.heads is None else config.heads[module_name]
            if max(heads) >= h:
                raise TargetError(f"lofit: heads[{module_name!r}] has head {max(heads)}, but the layer has {h} heads (0..{h - 1})")
        return LofitBranch(h, module.in_features // h, config.stage, heads, config.l1, module.weight.dtype)


def head_scores(model, name: str = "default") -> dict[str, torch.Tensor]:
    """‖aₕ‖₂ per head, ``{module: [H]}``, of a stage-"scale" LoFiT delta."""
    inner = getattr(model, "base_model", model)
    scores = {m: w.deltas[name].lofit_scale.detach().float().norm(dim=1) for m, w in iter_wrappers(inner)
              if name in w.deltas and isinstance(w.deltas[name], LofitBranch) and w.deltas[name].stage == "scale"}
    if not scores:
        raise ConfigError(f"no LoFiT scale-stage delta named {name!r} is attached")
    return scores


def select_heads(model, name: str = "default", top_percent: float = 10.0) -> LofitConfig:
    """The stage-"bias" config for the top ``top_percent`` % of heads (at least one) by ‖aₕ‖₂ over all layers."""
    if not 0 < top_percent <= 100:
        raise ConfigError(f"top_percent must be in (0, 100], got {top_percent}")
    scores = head_scores(model, name)
    flat = [(float(s), module, h) for module, row in scores.items() for h, s in enumerate(row.tolist())]
    keep = max(1, round(len(flat) * top_percent / 100))
    chosen: dict[str, list[int]] = {}
    for _, module, h in sorted(flat, key=lambda t: -t[0])[:keep]:
        chosen.setdefault(module, []).append(h)
    config = model.delta_configs[name]
    return LofitConfig(stage="bias", heads={m: sorted(chosen[m]) for m in scores if m in chosen}, num_heads=config.num_heads,
                       modules_to_save=config.modules_to_save)
