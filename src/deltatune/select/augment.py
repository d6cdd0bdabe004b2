"""EDA augmentation for small data sets (Wei & Zou, "EDA: easy data augmentation", 2019).

Four word-level operations, each changing about ``alpha * n_words`` words (at least one):

    synonym  replace words by a WordNet synonym — only when WordNet data is installed
             (``nltk`` with its ``wordnet`` corpus); otherwise this operation is done as
             ``insert`` instead, and :func:`wordnet_available` says which one ran
    insert   insert copies of words of the same example at random positions
    swap     swap two random words
    delete   drop each word with probability ``alpha`` (at least one, never all of them)

Everything is driven by one ``random.Random(seed)``, so a seed gives the same augmented set.
``augment_records`` leaves labels and other fields alone and rewrites only the text field.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Literal

from pydantic import Field

from deltatune.core.config import StrictConfig

Op = Literal["synonym", "insert", "swap", "delete"]


class AugmentConfig(StrictConfig):
    ops: list[Op] = ["synonym", "insert", "swap", "delete"]
    alpha: float = Field(0.1, gt=0, le=0.5)
    copies: int = Field(2, ge=1)  # augmented copies per original (the original is kept too)
    field: str = "text"
    seed: int = 0


@functools.lru_cache(maxsize=1)
def wordnet_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("good")
        return True
    except Exception:  # nltk missing, or its corpus not downloaded: both mean "no WordNet"
        return False


def _synonyms(word: str) -> list[str]:
    from nltk.corpus import wordnet

    names = {lemma.name().replace("_", " ") for syn in wordnet.synsets(word) for lemma in syn.lemmas()}
    names.discard(word)
    return sorted(names)


def eda(text: str, op: Op, alpha: float, rng: random.Random) -> str:
    """One EDA operation on whitespace-separated words of ``text``."""
    words = text.split()
    if not words:
        return text
    n = max(1, int(alpha * len(words)))
    if op == "synonym" and wordnet_available():
        candidates = [i for i, w in enumerate(words) if _synonyms(w)]
        rng.shuffle(candidates)
        for i in candidates[:n]:
            words[i] = rng.choice(_synonyms(words[i]))
        return " ".join(words)
    if op in ("synonym", "insert"):
        for _ in range(n):
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
        return " ".join(words)
    if op == "swap":
        for _ in range(n):
            if len(words) > 1:
                i, j = rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
        return " ".join(words)
    if op == "delete":
        if len(words) == 1:
            return text
        drop = [rng.random() < alpha for _ in words]
        if not any(drop):  # an augmented copy identical to its original adds nothing
            drop[rng.randrange(len(words))] = True
        if all(drop):
            drop[rng.randrange(len(words))] = False
        return " ".join(w for w, d in zip(words, drop) if not d)
    raise ValueError(f"unknown EDA operation {op!r}; expected synonym, insert, swap or delete")


def augment_records(rows: list[dict[str, Any]], config: AugmentConfig) -> list[dict[str, Any]]:
    """The originals followed by ``copies`` augmented versions of each, operations taken in turn."""
    rng = random.Random(config.seed)
    out = [dict(r) for r in rows]
    for row in rows:
        text = row.get(config.field)
        if not isinstance(text, str):
            continue
        for c in range(config.copies):
            op = config.ops[c % len(config.ops)]
            out.append({**row, config.field: eda(text, op, config.alpha, rng)})
    return out
