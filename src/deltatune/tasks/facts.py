"""Generated knowledge-injection tasks (FineTuneBench-style): facts a model cannot already know.

``new`` mode invents people with four attributes — birth city, birth year, occupation and
employer — from syllable-built names, so no fact is in any pre-training corpus. Each fact is
written as training questions in a few fixed phrasings; the evaluation asks three ways:

- ``memorization``: a phrasing seen in training (can the model recall what it was taught?);
- ``generalization``: a paraphrase never seen in training (does the knowledge transfer?);
- ``derived``: a question that needs the fact plus one step (the year a person turned 30).

``update`` mode changes facts the model already knows: it takes real ``(subject, relation,
object)`` facts, assigns each a different object of the same relation from the list, and writes
the updated fact the same three ways (derived questions only for years).

Every example is ``{"prompt", "response", "split", "fact"}``; train examples have split ``train``.
Prompts end without a space and responses start with one (`` Lonville``), the way BPE vocabularies
spell a word after a space; exact match strips it before comparing.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from deltatune.utils.errors import ConfigError

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr".split()
_VOWELS = "a e i o u ai ea ou".split()
_CODAS = ["", "n", "r", "l", "s", "th", "m"]
OCCUPATIONS = ["glassblower", "cartographer", "beekeeper", "astronomer", "luthier", "archivist", "ferrier", "botanist"]

# relation → (training phrasings, paraphrases for evaluation); {s} the subject.
PHRASINGS = {
    "birth_city": (["Where was {s} born?", "{s} was born in the city of"], ["In which city did {s} come into the world?"]),
    "birth_year": (["In what year was {s} born?", "{s} was born in the year"], ["What is the birth year of {s}?"]),
    "occupation": (["What is the occupation of {s}?", "{s} works as a"], ["What does {s} do for a living?"]),
    "employer": (["Who employs {s}?", "{s} is employed by"], ["Which organisation does {s} work for?"]),
}
UPDATE_PHRASINGS = {  # for update mode: relations of real facts a user may give
    "capital": (["What is the capital of {s}?", "The capital of {s} is"], ["Which city is the seat of government of {s}?"]),
    "birth_year": PHRASINGS["birth_year"],
    "birth_city": PHRASINGS["birth_city"],
    "occupation": PHRASINGS["occupation"],
    "employer": PHRASINGS["employer"],
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def invent_facts(n: int, seed: int = 0) -> list[dict]:
    """``n`` fictional people, each ``{"subject", "birth_city", "birth_year", "occupation", "employer"}``; names unique."""
    if n < 1:
        raise ConfigError(f"invent_facts: n must be >= 1, got {n}")
    rng = random.Random(seed)
    people, seen = [], set()
    while len(people) < n:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if name in seen:
            continue
        seen.add(name)
        people.append({"subject": name, "birth_city": _word(rng, 3), "birth_year": str(rng.randint(1850, 1990)),
                       "occupation": rng.choice(OCCUPATIONS), "employer": f"the {_word(rng, 2)} Company"})
    return people


def _examples(subject: str, relation: str, answer: str, phrasings: dict) -> list[dict]:
    trained, paraphrased = phrasings[relation]
    fact = f"{subject} | {relation} | {answer}"
    answer = " " + answer  # the answer's word starts with its space, as BPE vocabularies spell words
    out = [{"prompt": p.format(s=subject), "response": answer, "split": "train", "fact": fact} for p in trained]
    out.append({"prompt": trained[0].format(s=subject), "response": answer, "split": "memorization", "fact": fact})
    out += [{"prompt": p.format(s=subject), "response": answer, "split": "generalization", "fact": fact} for p in paraphrased]
    if relation == "birth_year":
        out.append({"prompt": f"In what year did {subject} turn 30?", "response": " " + str(int(answer) + 30), "split": "derived", "fact": fact})
    return out


def make_fact_task(n_people: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) of ``new`` mode: every attribute of ``n_people`` invented people."""
    examples = []
    for person in invent_facts(n_people, seed):
        for relation in PHRASINGS:
            examples += _examples(person["subject"], relation, person[relation], PHRASINGS)
    return [e for e in examples if e["split"] == "train"], [e for e in examples if e["split"] != "train"]


def make_update_task(facts: Sequence[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) of ``update`` mode over real facts ``{"subject", "relation", "object"}``: each
    gets a different object of the same relation, drawn from the list's other facts."""
    by_relation: dict[str, list[dict]] = {}
    for i, f in enumerate(facts):
        if not all(isinstance(f.get(k), str) and f[k] for k in ("subject", "relation", "object")):
            raise ConfigError(f"update fact {i} needs non-empty strings 'subject', 'relation', 'object'; got {f!r}")
        if f["relation"] not in UPDATE_PHRASINGS:
            raise ConfigError(f"update fact {i}: relation {f['relation']!r} has no phrasings; known: {', '.join(UPDATE_PHRASINGS)}")
        by_relation.setdefault(f["relation"], []).append(f)
    rng = random.Random(seed)
    examples = []
    for relation, group in by_relation.items():
        objects = sorted({f["object"] for f in group})
        if len(objects) < 2:
            raise ConfigError(f"update mode needs at least two different objects for relation {relation!r} to swap between")
        for f in group:
            new = rng.choice([o for o in objects if o != f["object"]])
            examples += _examples(f["subject"], relation, new, UPDATE_PHRASINGS)
    return [e for e in examples if e["split"] == "train"], [e for e in examples if e["split"] != "train"]
