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
As a data option (``data.augment: {copies: 2, seed: 0}``, :class:`deltatune.data.config.AugmentConfig`)
the training records are augmented after the evaluation split, so evaluation data never is.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Literal

from deltatune.data.config import AugmentConfig
from deltatune.data.formats import field_name
from deltatune.data.sources import Record

Op = Literal["synonym", "insert", "swap", "delete"]


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


def augment_records(rows: list[dict[str, Any]], config: AugmentConfig, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The originals followed by ``copies`` augmented versions of each, operations taken in turn."""
    rng = random.Random(config.seed)
    out = [dict(r) for r in rows]
    for row in rows:
        key = field_name(config.field, dict(columns or {}), row)
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            continue
        for c in range(config.copies):
            op = config.ops[c % len(config.ops)]
            out.append({**row, key: eda(text, op, config.alpha, rng)})
    return out


def augment_train_records(records: list[Record], config: AugmentConfig, columns: dict[str, str]) -> list[Record]:
    """:func:`augment_records` on data-pipeline records; copies say where they came from."""
    rng = random.Random(config.seed)
    out = list(records)
    for record in records:
        if record.data is None:
            continue
        key = field_name(config.field, columns, record.data)
        text = record.data.get(key)
        if not isinstance(text, str) or not text.strip():
            continue
        for c in range(config.copies):
            op = config.ops[c % len(config.ops)]
            out.append(Record({**record.data, key: eda(text, op, config.alpha, rng)}, f"{record.origin} (EDA {op})"))
    return out
