"""Retention: how much general ability a delta cost, always measured against the base on the same data.

Held-out general-text loss: the mean next-token negative log-likelihood over a text file the run
never trained on (any text the user points at; the package ships no corpus), cut into blocks of
``block_size`` tokens::

    loss = −(1/T) Σ_t log p(x_t | x_<t)        forgetting = loss(tuned) − loss(base)

A positive forgetting is ability lost. The base is the same model with its deltas disabled
(``DeltaModel.disable()``), or a separately loaded base model for a full fine-tune.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from deltatune.utils.errors import DataError


def read_text_tokens(tokenizer, path: str | Path, max_tokens: int) -> list[int]:
    """The file's first ``max_tokens`` tokens (read line by line, so a huge file is not tokenized whole)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"general text file {str(path)!r} does not exist")
    ids: list[int] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line in f:
                ids += tokenizer(line, add_special_tokens=False)["input_ids"]
                if len(ids) >= max_tokens:
                    break
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if len(ids) < 2:
        raise DataError(f"{path}: needs at least 2 tokens of text, found {len(ids)}")
    return ids[:max_tokens]


@torch.no_grad()
def text_loss(model, tokenizer, path: str | Path, block_size: int = 256, max_tokens: int = 16384, batch_size: int = 8) -> dict:
    """``{"loss", "perplexity", "tokens"}``: mean next-token NLL of the file's first ``max_tokens`` tokens."""
    ids = torch.tensor(read_text_tokens(tokenizer, path, max_tokens))
    blocks = [ids[i: i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            chunk = blocks[start: start + batch_size]
            width = max(len(b) for b in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for i, b in enumerate(chunk):
                batch[i, : len(b)], mask[i, : len(b)] = b, 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
            targets = batch[:, 1:].to(device).masked_fill(mask[:, 1:].to(device) == 0, -100)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def base_context(model, base_model=None):
    """A context in which ``base_model`` (or, for a DeltaModel, ``model`` with its deltas disabled) runs as the base."""
    if base_model is not None:
        return contextlib.nullcontext(base_model)
    if hasattr(model, "disable"):
        @contextlib.contextmanager
        def disabled():
            with model.disable():
                yield model
        return disabled()
    raise DataError("retention needs the base model: pass one for a full fine-tune (a model without attached deltas)")


def general_text_retention(model, tokenizer, path: str | Path, base_model=None, **kwargs) -> dict:
    """Tuned and base loss on the same text, and their difference (``forgetting``, > 0 is ability lost)."""
    tuned = text_loss(model, tokenizer, path, **kwargs)
    with base_context(model, base_model) as base:
        reference = text_loss(base, tokenizer, path, **kwargs)
    return {"file": Path(path).name, "loss": tuned["loss"], "base_loss": reference["loss"], "forgetting": tuned["loss"] - reference["loss"],
            "tokens": tuned["tokens"]}
