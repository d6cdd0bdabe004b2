"""Batches from examples: right padding, and sequence packing with isolated attention.

Label convention (both collators): ``labels[b, j]`` is the target for position ``j`` itself,
unshifted; the loss is ``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)``
(Hugging Face's convention). Padding positions have label -100.

Packing: several examples share one row of at most ``max_length`` tokens. Three things keep
each packed example exactly equivalent to running it alone:

1. ``position_ids`` restart at 0 at every example;
2. a 4-D additive attention mask, block-diagonal causal: a token attends only to earlier
   tokens *of its own example* (0 = allowed, ``finfo(dtype).min`` = blocked);
3. the label at every example's *first* position is -100, so the last token of example k is
   never trained to predict the first token of example k+1.

With those, the sum of token losses of each packed example equals its unpacked sum.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from deltatune.data.formats import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions carry no loss anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class PadCollator:
    """Right-pad a list of examples into tensors.

    LM examples (``input_ids``, ``labels``) → ``input_ids``, ``labels``, ``attention_mask``,
    all ``[B, S]`` int64, S = longest example (rounded up to ``pad_to_multiple_of``).
    Classification examples (``input_ids``, ``label`` …) → ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (if present) ``[B, S]`` and ``labels`` ``[B]``.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        seq = _round_up(max(len(e["input_ids"]) for e in examples), self.multiple)
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], seq, self.pad_id),
            "attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], seq, 0),
        }
        if "labels" in examples[0]:
            batch["labels"] = _pad([e["labels"] for e in examples], seq, IGNORE_INDEX)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], seq, 0)
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedy best-fit packing of LM examples into rows of at most ``max_length`` tokens.

    Each example goes into the open row with the least room that still fits it (else a new
    row); examples keep their relative order inside a row. Deterministic for a given input
    order, O(n log n). Returns rows ``{"input_ids", "labels", "position_ids", "lengths"}``
    where ``lengths`` are the example lengths in row order (the boundaries), and
    ``labels`` already has -100 at each example's first position.
    """
    rows: list[list[dict[str, Any]]] = []
    room: list[int] = []  # sorted free space of the open rows …
    owner: list[int] = []  # … and the row index each entry belongs to
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length={max_length}; truncate before packing")
        k = bisect.bisect_left(room, n)
        if k == len(room):  # nothing fits: open a new row
            rows.append([ex])
            free, row = max_length - n, len(rows) - 1
        else:
            free, row = room.pop(k) - n, owner.pop(k)
            rows[row].append(ex)
        if free > 0:
            j = bisect.bisect_left(room, free)
            room.insert(j, free)
            owner.insert(j, row)
    packed = []
    for row in rows:
        ids, labels, pos, lengths = [], [], [], []
        for ex in row:
            n = len(ex["input_ids"])
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            pos += range(n)
            lengths.append(n)
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos, "lengths": lengths})
    return packed


def block_causal_mask(lengths: Sequence[Sequence[int]], seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, S, S]``: 0 where query i may attend key j, ``finfo(dtype).min`` elsewhere.

    Allowed iff ``seg[i] == seg[j]`` and ``j <= i``, where ``seg`` numbers the examples of a
    row; the padding tail is one more segment, so no query row is fully blocked (a fully
    blocked row would give NaN with -inf, and a meaningless softmax anyway).
    Plain-PyTorch equivalent of what attention does with it:
    ``softmax(q @ k.T / sqrt(d) + mask) @ v`` per example, as if run alone.
    """
    seg = torch.empty(len(lengths), seq_len, dtype=torch.long)
    for b, row in enumerate(lengths):
        ids = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(list(row), dtype=torch.long))
        seg[b, : len(ids)] = ids
        seg[b, len(ids):] = len(row)  # padding segment
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class PackedCollator:
    """Collate rows from :func:`pack_examples` into model inputs for isolated packed attention.

    Returns ``input_ids``, ``labels``, ``position_ids`` ``[B, S]`` int64 (padding: pad id,
    -100, 0), ``attention_mask`` ``[B, 1, S, S]`` additive in ``mask_dtype`` — use the model's
    compute dtype, since SDPA requires a float mask of the query's dtype — and ``lengths``,
    a list (per row) of example lengths, for per-example metrics; it is not a model input.
    Call the model with ``input_ids``, ``attention_mask`` and ``position_ids`` only.
    """

    def __init__(self, pad_id: int, mask_dtype: torch.dtype = torch.float32, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.mask_dtype = mask_dtype
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        seq = _round_up(max(len(r["input_ids"]) for r in rows), self.multiple)
        lengths = [list(r["lengths"]) for r in rows]
        return {
            "input_ids": _pad([r["input_ids"] for r in rows], seq, self.pad_id),
            "labels": _pad([r["labels"] for r in rows], seq, IGNORE_INDEX),
            "position_ids": _pad([r["position_ids"] for r in rows], seq, 0),
            "attention_mask": block_causal_mask(lengths, seq, self.mask_dtype),
            "lengths": lengths,
        }


def make_collator(tokenizer: Any, packing: bool, mask_dtype: torch.dtype = torch.float32, pad_to_multiple_of: int | None = None):
    """The collator matching :func:`deltatune.data.build_datasets`' output for this config."""
    pad = pad_token_id(tokenizer)
    if packing:
        return PackedCollator(pad, mask_dtype=mask_dtype, pad_to_multiple_of=pad_to_multiple_of)
    return PadCollator(pad, pad_to_multiple_of=pad_to_multiple_of)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out
