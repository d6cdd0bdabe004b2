"""What prefix tuning and prompt tuning share: both add *virtual tokens* to the sequence.

They act on the model's backbone (``model.model`` for llama, ``model.bert`` for BERT — the
module named by ``base_model_prefix``), not on one layer: their branch wraps the backbone's whole
call (:attr:`DeltaBranch.wraps_call`) and rewrites its arguments. Because the backbone itself is
wrapped, the delta is applied whether the user calls the task model, the DeltaModel facade,
``generate()``, or the backbone directly (as the trainer's chunked LM loss does).

Virtual-token positions come first: a real token at position ``p`` of the input sits at ``V + p``
(``V`` virtual tokens), the same as PEFT's forward, whether or not ``position_ids`` are passed.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaMethod
from deltatune.utils.errors import TargetError
from deltatune.utils.hf_cache import get_cache, pop_cache


class VirtualTokenConfig(DeltaConfig):
    """``num_virtual_tokens``: V, the number of trainable positions added in front of every input."""

    num_virtual_tokens: int = Field(20, gt=0)


def backbone_name(model: nn.Module) -> str:
    """The logical name of the model's backbone (the child named by ``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", None)
    children = dict(model.named_children())
    if not prefix or prefix not in children:
        raise TargetError(
            f"{type(model).__name__} has no backbone child module (base_model_prefix={prefix!r}); virtual-token methods "
            "wrap the backbone of a task model, e.g. LlamaForCausalLM.model or BertForSequenceClassification.bert"
        )
    return prefix


def forward_params(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


def bind(names: list[str], args: tuple, kwargs: dict[str, Any], cache_arg: str | None) -> dict[str, Any]:
    """Positional arguments → keywords, so the branch can edit any argument by name. The KV cache
    goes under ``cache_arg``, the name the backbone takes: the caller may use the other one."""
    kw = {**dict(zip(names, args)), **kwargs}
    if cache_arg is not None:
        cache = pop_cache(kw)
        if cache is not None:
            kw[cache_arg] = cache
    return kw


def batch_size(kw: dict[str, Any]) -> int:
    ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if ref is None:
        raise TargetError("virtual-token delta: the backbone was called without input_ids or inputs_embeds")
    return ref.shape[0]


def extend_for_virtual_tokens(kw: dict[str, Any], n: int, prepend_positions: bool) -> None:
    """Make the call's masks and positions cover ``n`` virtual positions in front (in place).

    attention_mask (2-D): ones for the virtual positions are prepended (a 4-D mask is the
    caller's own business). position_ids: shifted by ``n``; with ``prepend_positions`` the
    virtual tokens' own positions ``0..n-1`` are prepended (prompt tuning feeds them as inputs).
    """
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    pos = kw.get("position_ids")
    if pos is not None:
        shifted = pos + n
        if prepend_positions:
            virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            shifted = torch.cat([virtual, shifted], dim=-1)
        kw["position_ids"] = shifted


def cache_is_filled(kw: dict[str, Any]) -> bool:
    """True on later decode steps: the KV cache already holds the virtual tokens."""
    cache = get_cache(kw)
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


class VirtualTokenMethod(DeltaMethod):
    """Shared target logic: the one target is the backbone (``targets`` may name it explicitly)."""

    target_kind = "the model's backbone (e.g. 'model' for llama, 'bert' for BERT)"
    # Both store one [V, ·] table as PEFT's prompt learning does: top-level key, "base_model." prefix.
    capabilities = Capabilities(mergeable=False, unchanged_at_init=False)
    branch_keys = ("prompt_embeddings",)
    unprefixed_keys = ("prompt_embeddings",)
    file_prefix = "base_model."

    def resolve_targets(self, model: nn.Module, config: DeltaConfig) -> str | list[str]:
        return config.targets if config.targets is not None else [backbone_name(model)]

    def can_wrap(self, module: nn.Module) -> bool:
        return hasattr(module, "get_input_embeddings") and "inputs_embeds" in forward_params(module)
