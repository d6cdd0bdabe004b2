"""Numeric answers: GSM8K writes the final answer after ``####``; a model's text may end with it
or just contain numbers. The compared form drops thousands separators, a leading ``+`` and a
trailing ``.0``, so ``"1,000"``, ``"+1000"`` and ``"1000.0"`` are one answer."""
from __future__ import annotations

import re
from collections.abc import Sequence

FINAL_ANSWER = re.compile(r"####\s*([-+]?\$?[\d,]*\.?\d+)")
NUMBER = re.compile(r"[-+]?\$?\d[\d,]*\.?\d*|[-+]?\.\d+")


def _canonical(number: str) -> str | None:
    text = number.replace(",", "").replace("$", "").lstrip("+").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def extract_number(text: str) -> str | None:
    """The answer a text gives: the number after ``####`` if there is one, else its last number."""
    final = FINAL_ANSWER.search(text)
    if final:
        return _canonical(final.group(1))
    numbers = NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


def numeric_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose extracted number equals the reference's (no number: wrong)."""
    if len(predictions) != len(references):
        raise ValueError(f"numeric_accuracy: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = 0
    for pred, ref in zip(predictions, references):
        expected = extract_number(ref)
        hits += expected is not None and extract_number(pred) == expected
    return hits / len(references)
