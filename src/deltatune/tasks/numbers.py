"""Generated number-understanding tasks: the default training job's data.

In the spirit of the "Number Cookbook" benchmark family: small, exactly checkable tasks whose
answers are a few characters, so a ~135M model learns them with LoRA in a few hundred steps.
Every example is ``{"prompt": str, "response": str, "task": str}``; the training text is
``prompt + response`` and the answer is scored by exact match of the response.

Tasks (``d`` = ``digits``; "d-digit" means ``10**(d-1) <= n < 10**d``, or ``0 <= n < 10`` for d = 1):

``addition`` (the default)
    ``"123+456="`` -> ``"579"``. Both operands d-digit, uniform.
``comparison``
    ``"Which is larger, 412 or 398?"`` -> ``"412"``. Two different d-digit numbers; the answer
    is the larger one, written as in the prompt.
``digit_count``
    ``"How many digits in 40213?"`` -> ``"5"``. The length L is uniform in 1..2d, then the
    number is a uniform L-digit number.
``word_addition``
    ``"three hundred twelve plus forty-one="`` -> ``"353"``. Operands uniform in
    ``0 <= n < 10**d``, written by :func:`number_to_words` (US style, no "and", hyphenated
    21..99); the answer is in digits.

Prompts carry no trailing space and responses no leading space, so the boundary between them
tokenizes the same way in training and in :func:`deltatune.train.evaluate.exact_match`.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence

from deltatune.utils.errors import ConfigError, DataError, did_you_mean
from deltatune.utils.io import write_text_atomic

DEFAULT_TASK = "addition"
MAX_DIGITS = 12  # number_to_words goes up to the billions

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def number_to_words(n: int) -> str:
    """English words for ``0 <= n < 10**12``: 312 -> "three hundred twelve", 41 -> "forty-one".

    US style: no "and", hyphens between tens and units, scale words thousand/million/billion.
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 10**MAX_DIGITS:
        raise ConfigError(f"number_to_words takes an int in [0, 10**{MAX_DIGITS}), got {n!r}")
    if n == 0:
        return "zero"
    parts: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            parts.append(f"{_below_thousand(n // scale)} {name}")
            n %= scale
    if n:
        parts.append(_below_thousand(n))
    return " ".join(parts)


def _below_thousand(n: int) -> str:
    """Words for 1 <= n < 1000."""
    parts: list[str] = []
    if n >= 100:
        parts.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        parts.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n:
        parts.append(_ONES[n])
    return " ".join(parts)


# ----------------------------------------------------------------------------- generators
# Each task is a generator (rng, digits) -> (prompt, response) plus the number of distinct
# prompts it can produce, which lets make_number_task refuse impossible sizes up front.


def _d_digit(rng: random.Random, d: int) -> int:
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def _n_d_digit(d: int) -> int:
    return 10**d - (10 ** (d - 1) if d > 1 else 0)


def _addition(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _d_digit(rng, d), _d_digit(rng, d)
    return f"{a}+{b}=", str(a + b)


def _comparison(rng: random.Random, d: int) -> tuple[str, str]:
    a = _d_digit(rng, d)
    b = _d_digit(rng, d)
    while b == a:  # equal numbers have no "larger" answer
        b = _d_digit(rng, d)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _digit_count(rng: random.Random, d: int) -> tuple[str, str]:
    # Uniform length first: uniform numbers below 10**(2d) would almost all have 2d digits.
    length = rng.randint(1, 2 * d)
    return f"How many digits in {_d_digit(rng, length)}?", str(length)


def _word_addition(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = rng.randrange(10**d), rng.randrange(10**d)
    return f"{number_to_words(a)} plus {number_to_words(b)}=", str(a + b)


_Generator = Callable[[random.Random, int], tuple[str, str]]
_TASKS: dict[str, tuple[_Generator, Callable[[int], int]]] = {
    "addition": (_addition, lambda d: _n_d_digit(d) ** 2),
    "comparison": (_comparison, lambda d: _n_d_digit(d) * (_n_d_digit(d) - 1)),
    "digit_count": (_digit_count, lambda d: 10 ** (2 * d)),
    "word_addition": (_word_addition, lambda d: 10 ** (2 * d)),
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def parse_task_names(task: str | Sequence[str]) -> list[str]:
    """``"addition"``, ``"addition,comparison"`` or a list of names -> validated, de-duplicated list."""
    raw = task.split(",") if isinstance(task, str) else list(task)
    names = [str(t).strip() for t in raw if str(t).strip()]
    if not names:
        raise ConfigError(f"task: no task name given; valid names: {', '.join(TASK_NAMES)}")
    for name in names:
        if name not in _TASKS:
            raise ConfigError(
                f"task: unknown number task {name!r}{did_you_mean(name, TASK_NAMES)}; "
                f"valid names: {', '.join(TASK_NAMES)}"
            )
    return list(dict.fromkeys(names))


def make_number_task(
    task: str | Sequence[str], n_train: int, n_eval: int, seed: int, digits: int = 3
) -> tuple[list[dict], list[dict]]:
    """Deterministic, disjoint train / eval sets of a number task (or a mix of tasks).

    Example ``i`` of one pooled sequence uses task ``names[i % len(names)]`` (an even
    interleave); prompts are drawn from ``random.Random(seed)`` and any prompt already drawn is
    redrawn, so no prompt repeats and no eval prompt appears in train. The first ``n_eval``
    examples are the eval set and the rest the train set: the eval set depends only on
    ``(task, n_eval, seed, digits)``, so it stays fixed when ``n_train`` changes.

    Raises ConfigError for an unknown task, bad sizes, or more examples than a task has
    distinct prompts (at most half of them are drawn, which keeps redrawing cheap).
    """
    names = parse_task_names(task)
    for key, value in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}: expected an int >= 0, got {value!r}")
    if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= MAX_DIGITS:
        raise ConfigError(f"digits: expected an int in 1..{MAX_DIGITS}, got {digits!r}")

    total = n_train + n_eval
    for j, name in enumerate(names):
        share = len(range(j, total, len(names)))
        capacity = _TASKS[name][1](digits)
        if share > capacity // 2:
            raise ConfigError(
                f"task {name!r} with digits={digits} has {capacity} distinct prompts; "
                f"{share} of the {total} requested examples would use it, at most "
                f"{capacity // 2} allowed: raise digits or lower n_train / n_eval"
            )

    rng = random.Random(seed)
    seen: set[str] = set()
    pool: list[dict] = []
    for i in range(total):
        name = names[i % len(names)]
        generate = _TASKS[name][0]
        prompt, response = generate(rng, digits)
        while prompt in seen:  # expected < 2 redraws: at most half the prompt space is used
            prompt, response = generate(rng, digits)
        seen.add(prompt)
        pool.append({"prompt": prompt, "response": response, "task": name})
    return pool[n_eval:], pool[:n_eval]


def write_jsonl(examples: Sequence[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically (a crash leaves any previous file intact).

    Each example must have string ``prompt`` and ``response`` fields (DataError otherwise).
    """
    lines = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise DataError(f"{os.fspath(path)}: example {i} is a {type(example).__name__}, expected a dict")
        for key in ("prompt", "response"):
            if not isinstance(example.get(key), str):
                raise DataError(
                    f"{os.fspath(path)}: example {i} field {key!r} is {example.get(key)!r}, expected a string"
                )
        lines.append(json.dumps(example, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(lines))
