"""Per-request sampling parameters and the batched next-token choice.

Processing order follows transformers' ``generate``: temperature, then top-k, then top-p.
Greedy rows (temperature 0) take the argmax of the raw logits, so a greedy request yields the
same tokens as ``model.generate(do_sample=False)``.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from deltatune.core.config import StrictConfig


class SamplingParams(StrictConfig):
    """``temperature == 0``: greedy. ``seed``: per-request RNG seed (None: a fresh random one).
    ``stop``: strings that end the completion (not included in the text)."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row's logits [V] → the logits to sample from (removed tokens at -inf)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the line stays).
        remove = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row. ``logits``: [b, V]; greedy rows in one argmax, sampled rows with their own RNG."""
    tokens = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            # Drawn on the CPU with the request's CPU generator whatever the model's device: a seed
            # gives the same tokens on CPU and GPU, and CUDA's multinomial would refuse a CPU generator.
            probs = filter_logits(logits[i].float().cpu(), p.temperature, p.top_k, p.top_p).softmax(-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def stop_hit(text: str, stops: tuple[str, ...], new_from: int = 0) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None.

    ``new_from``: ``text[:new_from]`` was searched before, so a stop string can only end after it;
    the search starts ``len(stop) - 1`` characters earlier (a constant cost per token, not O(text))."""
    found = [i for i in (text.find(s, max(0, new_from - len(s) + 1)) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop string (not streamed yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep
