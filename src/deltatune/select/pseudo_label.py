"""Pseudo-labels for an unlabelled pool, from a trained classifier.

The pseudo-label warm-up of "Predictions for pre-training language models" (train on the labelled
set, label an unlabelled pool with that model, warm up on the pseudo-labels, fine-tune on the
labels again) is four commands: ``deltatune train``, ``deltatune label`` (this module),
``deltatune train`` on the labelled pool, ``deltatune train`` with ``model.adapter`` set to the
warm-up's delta (recipes/pseudo_label/). Only classification is covered: a label is the argmax
of the classifier, its confidence the softmax probability of that class.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from deltatune.data.formats import field_name
from deltatune.data.sources import Record
from deltatune.utils.errors import DataError


def record_texts(records: list[Record], columns: dict[str, str]) -> list[tuple[str, str | None]]:
    """(text, text_pair or None) of every record; a record without text fails naming its file:line."""
    texts = []
    for record in records:
        if record.error:
            raise DataError(f"{record.origin}: {record.error}")
        data = record.data or {}
        key = field_name("text", columns, data)
        text = data.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{record.origin}: field {key!r} must be non-empty text, got {text!r}; found keys {sorted(data)} "
                            "(map another column with --text-column)")
        pair = data.get(field_name("text_pair", columns, data))
        texts.append((text, pair if isinstance(pair, str) and pair else None))
    return texts


@torch.no_grad()
def pseudo_label(model: torch.nn.Module, tokenizer, texts: list[tuple[str, str | None]], max_length: int = 128,
                 batch_size: int = 64, min_confidence: float = 0.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label every (text, pair) with ``model``'s argmax class; keep those with confidence >= ``min_confidence``.

    Returns the kept rows (``text`` [, ``text_pair``], ``label`` id, ``confidence``) in pool order and
    a report: pool size, kept, per-label counts, mean confidence.
    """
    model.eval()
    rows, confidences = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        firsts = [t for t, _ in chunk]
        pairs = [p or "" for _, p in chunk] if any(p for _, p in chunk) else None
        enc = tokenizer(firsts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = model(**enc).logits.float().softmax(-1)
        conf, label = probs.max(-1)
        for (text, pair), c, y in zip(chunk, conf.tolist(), label.tolist()):
            confidences.append(c)
            if c >= min_confidence:
                row = {"text": text, **({"text_pair": pair} if pair else {}), "label": int(y), "confidence": round(c, 6)}
                rows.append(row)
    counts = Counter(r["label"] for r in rows)
    report = {"pool": len(texts), "kept": len(rows), "min_confidence": min_confidence,
              "labels": {str(k): counts[k] for k in sorted(counts)},
              "mean_confidence": sum(confidences) / len(confidences) if confidences else None}
    return rows, report
