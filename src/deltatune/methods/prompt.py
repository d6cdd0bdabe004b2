"""Prompt tuning (Lester et al., 2021): V trainable input embeddings in front of every input.

    inputs_embeds = [P ; E(input_ids)]        P ∈ R^{V × d} (the only trained tensor), E frozen

The attention mask gets V leading ones, ``token_type_ids`` V leading zeros, and positions start
at 0 on the virtual tokens (as PEFT does). **Outputs keep the input's length**: the V virtual
positions are cut from the backbone's ``last_hidden_state`` (and ``hidden_states``), so logits
are ``[batch, seq, vocab]`` for the real tokens, labels line up with them, and the trainer's
``CE(logits[:, :-1], labels[:, 1:])`` needs no change. A pooled output (BERT's CLS pooler) is
left as computed — it reads position 0, the first virtual token, exactly as in PEFT.

With ``generate()`` the prompt is fed once, on the first step (empty KV cache); later steps
only extend the attention mask and positions by V. The model's outputs change at attach time.
Files: PEFT's ``prompt_embeddings`` [V, d] (peft_type PROMPT_TUNING), readable both ways.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
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
from deltatune.utils.hf_cache import cache_arg_name


class PromptTuningConfig(VirtualTokenConfig):
    """``num_virtual_tokens``: V; ``init``: ``vocab`` (rows of the input embedding of V random
    vocabulary tokens — Lester et al. found this better than random) or ``random`` (normal with the
    embedding matrix's standard deviation)."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    init: Literal["vocab", "random"] = "vocab"


def strip_virtual(out, n: int):
    """Drop the first ``n`` positions of the sequence outputs (a ModelOutput or a tuple)."""
    if isinstance(out, tuple):
        return (out[0][:, n:], *out[1:])
    out.last_hidden_state = out.last_hidden_state[:, n:]
    if getattr(out, "hidden_states", None) is not None:
        out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
    return out


class PromptBranch(DeltaBranch):
    wraps_call = True

    def __init__(self, backbone: nn.Module, config: PromptTuningConfig):
        super().__init__()
        embed = backbone.get_input_embeddings()
        weight = embed.weight.detach()
        n = config.num_virtual_tokens
        if config.init == "vocab":
            init = weight[torch.randint(0, weight.shape[0], (n,), device=weight.device)].clone()
        else:
            init = torch.randn(n, weight.shape[1], device=weight.device, dtype=weight.dtype) * weight.float().std().to(weight.dtype)
        self.prompt_embeddings = nn.Parameter(init)
        self.num_virtual_tokens = n
        self.arg_names = forward_params(backbone)
        self.cache_arg = cache_arg_name(backbone)
        # A plain reference, not a submodule: the backbone's weights are not part of this delta.
        self.__dict__["backbone"] = backbone

    def forward(self, x, base_out):
        return base_out

    def around_call(self, call, *args, **kwargs):
        kw = bind(self.arg_names, args, kwargs, self.cache_arg)
        n = self.num_virtual_tokens
        if cache_is_filled(kw):  # a later decode step: the prompt is already in the KV cache
            extend_for_virtual_tokens(kw, n, prepend_positions=False)
            return call(**kw)
        b = batch_size(kw)
        embeds = kw.pop("inputs_embeds", None)
        ids = kw.pop("input_ids", None)
        if embeds is None:
            embeds = self.backbone.get_input_embeddings()(ids)
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        tt = kw.get("token_type_ids")
        if tt is not None:
            kw["token_type_ids"] = torch.cat([tt.new_zeros(b, n), tt], dim=1)
        extend_for_virtual_tokens(kw, n, prepend_positions=True)
        return strip_virtual(call(**kw), n)


@register
class PromptTuningMethod(VirtualTokenMethod):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    peft_type = "PROMPT_TUNING"

    def make_branch(self, module_name: str, module: nn.Module, config: PromptTuningConfig) -> PromptBranch:
        return PromptBranch(module, config)

    def to_peft_config(self, config: PromptTuningConfig, target_patterns: list[str], target_names: list[str]) -> dict[str, Any]:
        # token_dim / num_layers / num_attention_heads are left for PEFT to read from the model's config.
        return {
            "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
            "modules_to_save": config.modules_to_save or None,
        }

    def from_peft_config(self, peft_config: dict[str, Any], source: str) -> PromptTuningConfig:
        return PromptTuningConfig(
            num_virtual_tokens=peft_config["num_virtual_tokens"],
            modules_to_save=list(peft_config.get("modules_to_save") or []),
        )
