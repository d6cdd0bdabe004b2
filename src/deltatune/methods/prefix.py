"""Prefix tuning, P-tuning v2 style (Li & Liang, 2021; Liu et al., 2022): trainable keys and
values for V virtual positions in front of the sequence, at every attention layer.

    attention(q, [P_K ; K], [P_V ; V])      P_K, P_V ∈ R^{V × heads_kv × head_dim} per layer

Stored as one tensor ``prompt_embeddings`` [V, layers · 2 · heads_kv · head_dim] laid out
(layer, key|value, head, dim) — PEFT's PREFIX_TUNING file format. The prefix enters through
the model's own KV cache: on a call with an empty (or no) cache the branch puts the prefix into a
cache as the first V positions of every layer, and the attention mask gets V leading ones.
``generate()`` therefore sees the prefix exactly once; later decode steps find it in the cache
and only extend the mask and the positions by V. Real tokens sit at positions ``V + p``.

Optional reparameterisation (``projection_size``, Li & Liang's MLP): during training
``P = W₂ tanh(W₁ E + b₁) + b₂`` from a smaller embedding ``E`` [V, heads_kv · head_dim]. Only
``P`` is needed at inference, so saving folds the MLP away: the file holds ``P`` and the saved
config has ``projection_size: null``. Prefixes change outputs at attach time.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.method import DeltaBranch
from deltatune.core.registry import register
from deltatune.methods.virtual_tokens import (
    VirtualTokenConfig,
    VirtualTokenMethod,
    batch_size,
    bind,
    cache_is_filled,
    extend_for_virtual_tokens,
    forward_params,
)
from deltatune.utils.errors import TargetError
from deltatune.utils.hf_cache import cache_arg_name


class PrefixTuningConfig(VirtualTokenConfig):
    """``num_virtual_tokens``: V; ``projection_size``: hidden width of the reparameterisation MLP
    (None: train the prefix directly); ``init`` (direct prefixes only): ``vocab`` — the base
    model's own keys/values for V random vocabulary tokens (Li & Liang: real-word activations
    train more stably) — or ``random`` (normal, std 0.02)."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    projection_size: int | None = Field(None, gt=0)
    init: Literal["vocab", "random"] = "vocab"


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from a transformers config, as PEFT computes them."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return layers, kv_heads, config.hidden_size // heads


def prefix_numel(config, cfg: PrefixTuningConfig) -> int:
    """Trainable parameters: V·L·2·d_kv, or with the MLP V·d_kv + (d_kv+1)·h + (h+1)·L·2·d_kv."""
    layers, kv_heads, head_dim = kv_shape(config)
    d_kv, width = kv_heads * head_dim, layers * 2 * kv_heads * head_dim
    n = cfg.num_virtual_tokens
    if cfg.projection_size is None:
        return n * width
    h = cfg.projection_size
    return n * d_kv + (d_kv + 1) * h + (h + 1) * width


@torch.no_grad()
def activations_init(backbone: nn.Module, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The backbone's own keys/values for ``n`` random vocabulary tokens, as [n, L·2·H·D]."""
    from transformers import DynamicCache

    embed = backbone.get_input_embeddings()
    ids = torch.randint(0, embed.weight.shape[0], (1, n), device=embed.weight.device)
    cache = DynamicCache()
    backbone(input_ids=ids, use_cache=True, **{cache_arg_name(backbone): cache})
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(len(cache.layers))]
    # [1, H, n, D] per key/value → [n, L, 2, H, D]
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # [L, 2, H, n, D]
    return stacked.permute(3, 0, 1, 2, 4).reshape(n, -1).to(dtype)


class PrefixBranch(DeltaBranch):
    wraps_call = True

    def __init__(self, backbone: nn.Module, cfg: PrefixTuningConfig):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = kv_shape(backbone.config)
        self.num_virtual_tokens = n = cfg.num_virtual_tokens
        width = self.layers * 2 * self.kv_heads * self.head_dim
        ref = backbone.get_input_embeddings().weight
        if cfg.projection_size is not None:
            d_kv = self.kv_heads * self.head_dim
            self.embedding = nn.Parameter(torch.randn(n, d_kv, device=ref.device, dtype=ref.dtype))
            self.transform = nn.Sequential(nn.Linear(d_kv, cfg.projection_size), nn.Tanh(), nn.Linear(cfg.projection_size, width)).to(ref.device, ref.dtype)
        elif cfg.init == "vocab":
            init = activations_init(backbone, n, ref.dtype)
            if init.shape[1] != width:
                raise TargetError(f"prefix_tuning: {type(backbone).__name__}'s cache has {init.shape[1]} key/value features per token, expected {width}")
            self.prompt_embeddings = nn.Parameter(init)
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, width, device=ref.device, dtype=ref.dtype) * 0.02)
        self.arg_names = forward_params(backbone)
        self.cache_arg = cache_arg_name(backbone)

    def prefix(self) -> torch.Tensor:
        """P [V, L·2·H·D] (through the MLP while it is in use)."""
        if hasattr(self, "transform"):
            return self.transform(self.embedding)
        return self.prompt_embeddings

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix().detach()}

    def forward(self, x, base_out):
        return base_out

    def around_call(self, call, *args, **kwargs):
        from transformers import DynamicCache

        kw = bind(self.arg_names, args, kwargs, self.cache_arg)
        n = self.num_virtual_tokens
        injected = None
        if not cache_is_filled(kw):
            b = batch_size(kw)
            cache = kw.get(self.cache_arg)
            if cache is None:
                cache = DynamicCache()
            p = self.prefix().view(n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)  # [L, 2, H, V, D]
            for layer in range(self.layers):
                k, v = (t.unsqueeze(0).expand(b, -1, -1, -1) for t in p[layer])
                cache.update(k, v, layer)
            kw[self.cache_arg] = injected = cache
        extend_for_virtual_tokens(kw, n, prepend_positions=False)
        out = call(**kw)
        if injected is not None and kw.get("use_cache", None) is False:
            # The caller asked for no cache, but the model returns the one it was given, and
            # generate(use_cache=False) passes it back in; emptied, it gets a fresh prefix next call.
            injected.crop(-injected.get_seq_length())  # transformers 5: a negative count removes that many
        return out


@register
class PrefixTuningMethod(VirtualTokenMethod):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    peft_type = "PREFIX_TUNING"

    def can_wrap(self, module: nn.Module) -> bool:
        return super().can_wrap(module) and cache_arg_name(module) is not None

    def make_branch(self, module_name: str, module: nn.Module, config: PrefixTuningConfig) -> PrefixBranch:
        return PrefixBranch(module, config)

    def saved_config(self, config: PrefixTuningConfig) -> PrefixTuningConfig:
        return config.model_copy(update={"projection_size": None})

    def to_peft_config(self, config: PrefixTuningConfig, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        # The file always holds the folded prefix, so prefix_projection is false; PEFT reads
        # num_layers / token_dim / num_attention_heads (GQA: key/value heads) from the model's config.
        return {
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_transformer_submodules": 1,
            "prefix_projection": False,
            "modules_to_save": config.modules_to_save or None,
        }

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> PrefixTuningConfig:
        # PEFT's files hold the folded prefix even when it trained with prefix_projection.
        return PrefixTuningConfig(
            num_virtual_tokens=peft_config["num_virtual_tokens"],
            modules_to_save=list(peft_config.get("modules_to_save") or []),
        )
