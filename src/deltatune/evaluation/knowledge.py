"""Knowledge-injection scores: exact match per evaluation split of a fact task
(:mod:`deltatune.tasks.facts`): ``memorization`` (trained phrasings), ``generalization``
(unseen paraphrases) and ``derived`` (one step beyond the fact), reported apart because a model
can recite a fact it cannot use."""
from __future__ import annotations

from collections.abc import Sequence

from deltatune.train.evaluate import exact_match

SPLITS = ("memorization", "generalization", "derived")


def knowledge_scores(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 8, batch_size: int = 16) -> dict:
    """``{split: {"exact_match", "n"}}`` for every split present in ``examples``."""
    scores = {}
    for split in SPLITS:
        group = [{"prompt": e["prompt"], "response": e["response"]} for e in examples if e.get("split") == split]
        if group:
            result = exact_match(model, tokenizer, group, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
            scores[split] = {"exact_match": result["exact_match"], "n": result["n"]}
    return scores
