"""OT fusion vs plain weight averaging of two MiniLM SST-2 fine-tunes (different seeds).

Two cases, both measured on SST-2 dev (the ALPS 10% split in ../shared/data/sst2):

* the two fine-tunes as trained (same pretrained start, different data order and head init);
* the second fine-tune with its FFN neurons and attention heads relabelled by a random
  permutation — the same function (accuracy unchanged), the situation OT fusion is built for:
  networks whose hidden units do not correspond position by position.

Sizes can be raised for the benchmark (docs/benchmarks.md): DELTATUNE_OT_STEPS, DELTATUNE_OT_BATCH, DELTATUNE_OT_EVAL.
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.algebra.ot_fusion import ot_fuse, relabelled
from tests.helpers import SHARED_DATA

SST2 = SHARED_DATA / "sst2"
STEPS = int(os.environ.get("DELTATUNE_OT_STEPS", "30"))
BATCH = int(os.environ.get("DELTATUNE_OT_BATCH", "16"))
N_EVAL = int(os.environ.get("DELTATUNE_OT_EVAL", "400"))
MAX_LEN = 48

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SST2 / "train.tsv").exists(), reason="../shared/data/sst2 is not present")]


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(s.strip(), int(label)) for s, label in rows[1:]]


def fine_tune(train_rows, tokenizer, seed: int):
    torch.manual_seed(seed)
    model = deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2)
    model.train()
    rows = list(train_rows)
    random.Random(seed).shuffle(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(STEPS):
        batch = rows[step * BATCH:(step + 1) * BATCH]
        enc = tokenizer([s for s, _ in batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    correct = 0
    for i in range(0, len(rows), 200):
        batch = rows[i:i + 200]
        enc = tokenizer([s for s, _ in batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in batch])).sum())
    return correct / len(rows)


def relabel(model, seed: int):
    """A copy of ``model`` with the hidden units of every FFN block and attention layer permuted (same function)."""
    return relabelled(model, seed, heads=True)


def average(models):
    import copy

    states = [m.state_dict() for m in models]
    out = copy.deepcopy(models[0])
    # Same arithmetic as ot_fuse (float64 weighted sum), so the two differ only by the alignment.
    out.load_state_dict({k: sum(s[k].double() / len(states) for s in states).to(v.dtype) if v.is_floating_point() else v for k, v in states[0].items()})
    return out


def test_ot_fusion_beats_plain_averaging_on_sst2_dev(capsys):
    import copy

    tokenizer = deltatune.load_tokenizer("minilm-l6")
    train_rows = read_tsv(SST2 / "train.tsv")[: STEPS * BATCH * 2]
    dev = read_tsv(SST2 / "validation.tsv")[:N_EVAL]
    a, b = fine_tune(train_rows, tokenizer, seed=1), fine_tune(train_rows, tokenizer, seed=2)
    b_relabelled = relabel(b, seed=7)
    enc = tokenizer([s for s, _ in dev[:64]], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():  # relabelling is an exact symmetry: same function
        assert torch.allclose(b(**enc).logits, b_relabelled(**enc).logits, atol=1e-4)
    acc = {"a": accuracy(a, dev, tokenizer), "b": accuracy(b, dev, tokenizer)}
    for name, pair in (("same", [a, b]), ("relabelled", [a, b_relabelled])):
        acc[f"avg_{name}"] = accuracy(average(pair), dev, tokenizer)
        fused = copy.deepcopy(a)
        fused.load_state_dict(ot_fuse(pair, heads=True))
        acc[f"ot_{name}"] = accuracy(fused, dev, tokenizer)
    with capsys.disabled():
        print(f"\nSST-2 dev ({N_EVAL} rows, {STEPS} steps x {BATCH}): " + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    one_row = 1.0 / len(dev)
    assert min(acc["a"], acc["b"]) > 0.65   # the fine-tunes learned the task (majority class: 55.5 %)
    # As trained, the units already correspond: OT keeps them in place, so it equals averaging.
    assert acc["ot_same"] >= acc["avg_same"] - 1e-9
    # With relabelled units, averaging mixes unrelated neurons; OT aligns them first and gets the
    # un-relabelled fusion back (up to a rounding-level argmax flip).
    assert acc["ot_relabelled"] > acc["avg_relabelled"]
    assert abs(acc["ot_relabelled"] - acc["ot_same"]) <= one_row
