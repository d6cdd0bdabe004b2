"""Probes of what a causal LM can still do: few-shot in-context classification and cloze facts.

**In-context probe** (ProMoT's retention measure, also a task metric): each test example is
scored with k demonstrations from a training set in front of it::

    prompt = demo_1 … demo_k + template(text)        demo_i = template(text_i) + verbalizer(label_i) + "\\n"
    prediction = argmax_c  Σ_t log p(verbalizer(c)_t | prompt, verbalizer(c)_<t)

(the choice's summed log-likelihood, lm-eval's multiple-choice rule). Demonstrations are drawn once
with a seed and shared by every example, so the tuned model and its base see the same prompts.

**Knowledge probe** (LAMA-style): cloze facts ``{"prompt": "The capital of France is", "answer":
" Paris"}``; precision@1 is the fraction whose most likely next token is the answer's first token.
:func:`known_facts` keeps, from a user's list, the facts the base model gets right, so that a
delta's probe score measures how much of what the base knew survived (1.0 for the base itself).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from deltatune.utils.errors import DataError


@dataclass(frozen=True)
class ClassificationProbe:
    """``template`` holds ``{text}``; ``verbalizers[label]`` is the answer text of each label."""

    name: str
    test: Sequence[dict]            # {"text": str, "label": int}
    train: Sequence[dict]           # demonstrations come from here
    verbalizers: Sequence[str]
    template: str = "{text}\nAnswer:"
    shots: int = 4
    seed: int = 0
    demonstrations: list[dict] = field(default_factory=list, compare=False)

    def __post_init__(self):
        if "{text}" not in self.template:
            raise DataError(f"probe {self.name!r}: template must contain {{text}}, got {self.template!r}")
        for where, rows in (("test", self.test), ("train", self.train)):
            for i, row in enumerate(rows):
                if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), int) or not 0 <= row["label"] < len(self.verbalizers):
                    raise DataError(f"probe {self.name!r}: {where} row {i} needs a string 'text' and an int 'label' in [0, {len(self.verbalizers)}), got {row!r}")
        if self.shots > len(self.train):
            raise DataError(f"probe {self.name!r}: {self.shots} shots but only {len(self.train)} training rows")
        self.demonstrations.extend(random.Random(self.seed).sample(list(self.train), self.shots))

    def context(self, text: str) -> str:
        demos = "".join(self.template.format(text=d["text"]) + self.verbalizers[d["label"]] + "\n\n" for d in self.demonstrations)
        return demos + self.template.format(text=text)


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, context: str, choices: Sequence[str]) -> list[float]:
    """Σ log p(choice tokens | context) per choice; the choice's tokens are those the context + choice
    text adds (lm-eval's split, so a merge at the seam is scored as the model would see it)."""
    device = next(model.parameters()).device
    ctx = tokenizer(context)["input_ids"]
    wholes = [tokenizer(context + c)["input_ids"] for c in choices]
    width = max(len(w) for w in wholes)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(wholes), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, w in enumerate(wholes):
        ids[i, : len(w)], mask[i, : len(w)] = torch.tensor(w), 1
    logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    scores = []
    for i, w in enumerate(wholes):
        start = len(ctx) if w[: len(ctx)] == ctx else len(ctx) - 1  # the tokenizer merged across the seam: score from the merge
        scores.append(sum(float(logp[i, t - 1, w[t]]) for t in range(max(start, 1), len(w))))
    return scores


def few_shot_accuracy(model, tokenizer, probe: ClassificationProbe) -> dict:
    """``{"accuracy", "n", "shots"}`` of the model on the probe's test rows with its demonstrations."""
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for row in probe.test:
            scores = choice_log_likelihoods(model, tokenizer, probe.context(row["text"]), probe.verbalizers)
            hits += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    finally:
        model.train(was_training)
    return {"accuracy": hits / len(probe.test) if probe.test else 0.0, "n": len(probe.test), "shots": probe.shots}


@torch.no_grad()
def cloze_precision_at_1(model, tokenizer, facts: Sequence[dict]) -> dict:
    """``{"precision_at_1", "n", "hits": [bool]}``: is the most likely next token the answer's first token?"""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = []
    try:
        for i, fact in enumerate(facts):
            if not isinstance(fact.get("prompt"), str) or not isinstance(fact.get("answer"), str) or not fact["answer"]:
                raise DataError(f"fact {i} needs string 'prompt' and non-empty 'answer', got {fact!r}")
            prompt = tokenizer(fact["prompt"])["input_ids"]
            whole = tokenizer(fact["prompt"] + fact["answer"])["input_ids"]
            if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
                raise DataError(f"fact {i}: the answer {fact['answer']!r} merges into the prompt's last token; start it with a space")
            logits = model(input_ids=torch.tensor([prompt], device=device)).logits[0, -1]
            hits.append(int(logits.argmax()) == whole[len(prompt)])
    finally:
        model.train(was_training)
    return {"precision_at_1": sum(hits) / len(hits) if hits else 0.0, "n": len(hits), "hits": hits}


def known_facts(model, tokenizer, candidates: Sequence[dict]) -> list[dict]:
    """The candidate facts the model gets right at precision@1 (run it on the base model)."""
    result = cloze_precision_at_1(model, tokenizer, candidates)
    return [fact for fact, hit in zip(candidates, result["hits"]) if hit]
