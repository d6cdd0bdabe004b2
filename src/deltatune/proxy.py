"""Logit arithmetic at decode time: emulated fine-tuning (Mitchell et al. 2023) / proxy tuning (Liu et al. 2024).

A large base model is steered by the difference a fine-tune made to a small model::

    logits_t = big(x_<t) + w · (small_tuned(x_<t) − small_base(x_<t))

``w = 0`` is the big model alone; with ``big`` = ``small_base`` and ``w = 1`` it is the small tuned
model. All three models must share a tokenizer (the arithmetic is per token id); each keeps its
own KV cache, so a step costs one new-token forward per model.

A model passed as a plain ``transformers`` model means *that base*: if deltas are attached to it
(e.g. ``small_tuned = deltatune.load_delta(small_base, adapter)``), its forward runs with them
disabled. Pass the :class:`DeltaModel` to get the tuned model — so one small model in memory
serves both roles.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from deltatune.core.delta_model import _OWNER_ATTR, DeltaModel
from deltatune.generation import SamplingParams, render_prompt
from deltatune.utils.errors import ConfigError
from deltatune.utils.hf_cache import cache_arg_name, output_cache


def proxy_logits(big: torch.Tensor, small_base: torch.Tensor, small_tuned: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``big + weight · (small_tuned − small_base)`` over the vocabulary columns all three have.

    Shapes ``[..., V_i]``; models may pad their output layers differently, so the result has
    ``min(V_i)`` columns (callers check that this covers the tokenizer's vocabulary).
    """
    v = min(big.shape[-1], small_base.shape[-1], small_tuned.shape[-1])
    return big[..., :v].float() + weight * (small_tuned[..., :v].float() - small_base[..., :v].float())


def check_shared_vocab(tokenizers: dict[str, object]) -> None:
    """Refuse tokenizers that map any token to a different id (the logit arithmetic is per id)."""
    (first_name, first), *rest = tokenizers.items()
    ref = first.get_vocab()
    for name, tok in rest:
        vocab = tok.get_vocab()
        if vocab == ref:
            continue
        diff = sorted(set(vocab.items()) ^ set(ref.items()), key=lambda kv: kv[1])[:2]
        raise ConfigError(
            f"{name} and {first_name} do not share a tokenizer ({len(vocab)} vs {len(ref)} tokens; e.g. {diff}); "
            "logit arithmetic needs the same vocabulary"
        )


def _runner(model: nn.Module):
    """The context a role's forward runs in: plain models with attached deltas run with them disabled."""
    if isinstance(model, DeltaModel):
        return contextlib.nullcontext
    facade = model.__dict__.get(_OWNER_ATTR)
    if facade is not None and facade.delta_configs:
        return facade.disable
    return contextlib.nullcontext


class _CachedModel:
    """One role: a model, the context it runs in and its KV cache."""

    def __init__(self, model: nn.Module):
        self.model, self.context, self.cache = model, _runner(model), None

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        with self.context():
            cache = {cache_arg_name(self.model): self.cache} if self.cache is not None else {}
            out = self.model(input_ids=ids, use_cache=True, **cache)
        self.cache = output_cache(out)
        return out.logits[:, -1, :]


def _sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax(-1))
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def proxy_generate_ids(
    big: nn.Module,
    small_base: nn.Module,
    small_tuned: nn.Module,
    input_ids: torch.Tensor,
    weight: float = 1.0,
    sampling: SamplingParams = SamplingParams(),
    eos_token_id: int | list[int] | None = None,
    vocab_size: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """New token ids after ``input_ids`` ([1, T]) under ``big + weight · (small_tuned − small_base)``.

    ``vocab_size``: the tokenizer's size; every model must produce at least that many logits.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"proxy generation takes one prompt: input_ids of shape [1, T] (got {list(input_ids.shape)})")
    roles = {"big": big, "small base": small_base, "small tuned": small_tuned}
    for name, model in roles.items():
        model.eval()
        width = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None else None
        if vocab_size is not None and width is not None and width < vocab_size:
            raise ConfigError(f"{name} model has {width} output logits but the tokenizer has {vocab_size} tokens; the models do not share a vocabulary")
    runners = [_CachedModel(m) for m in roles.values()]
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generator = torch.Generator().manual_seed(sampling.seed)
    device = next(big.parameters()).device
    ids = input_ids.to(device)
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        logits = proxy_logits(*(r.step(ids.to(next(r.model.parameters()).device)) for r in runners), weight=weight)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        token = _sample(logits[0].cpu(), sampling, generator)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            break
        ids = torch.tensor([[token]], device=device)
    return new


def proxy_generate_text(big, small_base, small_tuned, tokenizer, prompt: str, weight: float = 1.0, sampling: SamplingParams = SamplingParams(),
                        chat: bool = False, stream: bool = False) -> str:
    """:func:`proxy_generate_ids` on a text prompt (raw or chat-templated); ``stream`` prints text as it comes."""
    import sys

    text = render_prompt(tokenizer, prompt, chat)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    new: list[int] = []
    printed = [0]

    def show(token: int) -> None:
        new.append(token)
        out = tokenizer.decode(new, skip_special_tokens=True)
        sys.stdout.write(out[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(out)

    ids = proxy_generate_ids(big, small_base, small_tuned, enc["input_ids"], weight, sampling, tokenizer.eos_token_id, len(tokenizer), show if stream else None)
    if stream:
        sys.stdout.write("\n")
    return tokenizer.decode(ids, skip_special_tokens=True)
