"""Model soups of real MiniLM-L6 fine-tunes on SST-2 (short fine-tunes from one shared init)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import parse_recipe
from deltatune.algebra.soup import Evaluator
from tests.helpers import SHARED_DATA

SST2 = SHARED_DATA / "sst2"
DEV_EXAMPLES = 300  # the first 300 dev sentences: keeps six evaluations affordable on CPU
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="SST-2 not in ../shared/data")]


def fine_tune(init: Path, out: Path, rows, seed: int, steps: int = 15) -> Path:
    """A short full fine-tune from ``init``: its own data order (seed) and dropout noise."""
    tok = deltatune.load_tokenizer(init)
    model = deltatune.load_model(init, task="sequence-classification", num_labels=2)
    model.train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=g).tolist()
        batch = tok([rows[i][0] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt")
        model(**batch, labels=torch.tensor([int(rows[i][1]) for i in idx])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_soups_of_sst2_fine_tunes_beat_the_mean(tmp_path):
    torch.set_num_threads(2)
    rows = list(csv.reader(open(SST2 / "train.tsv", encoding="utf-8"), delimiter="\t"))[1:5001]
    torch.manual_seed(0)  # one shared init, classifier head included: soups average models of one basin
    init = deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2)
    init.save_pretrained(tmp_path / "init")
    deltatune.load_tokenizer("minilm-l6").save_pretrained(tmp_path / "init")
    fts = [fine_tune(tmp_path / "init", tmp_path / f"ft{s}", rows, seed=s) for s in (1, 2, 3)]
    dev = SST2 / "validation.tsv"
    report = run_merge(parse_recipe({
        "inputs": [{"path": str(p)} for p in fts], "method": "greedy_soup",
        "eval": {"data": str(dev), "task": "sequence-classification", "metric": "accuracy", "batch_size": 128, "max_examples": DEV_EXAMPLES},
        "output": {"path": str(tmp_path / "greedy")},
    }), log=lambda *a: None)
    run_merge(parse_recipe({"inputs": [{"path": str(p)} for p in fts], "method": "linear", "output": {"path": str(tmp_path / "uniform")}}))

    # The report's numbers, measured again: every input and both soups scored as models of their own.
    def accuracy(model_dir: Path, state: dict | None = None) -> float:
        evaluator = Evaluator(model_dir, dev, "sequence-classification", max_examples=DEV_EXAMPLES, batch_size=128)
        return evaluator.score(state)["accuracy"]

    individual = {str(p): accuracy(p) for p in fts}
    greedy, uniform = accuracy(tmp_path / "greedy"), accuracy(tmp_path / "uniform")
    mean = sum(individual.values()) / len(individual)
    print(f"SST-2 dev accuracy: inputs {list(individual.values())}, mean {mean:.4f}, uniform soup {uniform:.4f}, "
          f"greedy soup {greedy:.4f} of {len(report['members'])}")
    assert report["individual"] == individual and report["soup"] == greedy
    assert uniform >= mean

    def mean_weights(paths) -> dict[str, torch.Tensor]:
        tensors = [load_file(str(Path(p) / "model.safetensors")) for p in paths]
        return {k: sum(t[k] for t in tensors) / len(tensors) for k in tensors[0]}

    # The greedy soup is the mean of its members' weights, and each input it left out lowered the
    # score of the soup it was tried with (inputs tried best first).
    soup, want = load_file(str(tmp_path / "greedy" / "model.safetensors")), mean_weights(report["members"])
    assert soup.keys() == want.keys() and all(torch.allclose(soup[k], want[k], atol=1e-6) for k in soup)
    chosen, best = [], -1.0
    for p in sorted(individual, key=lambda p: -individual[p]):
        score = accuracy(fts[0], mean_weights([*chosen, p]))
        if score >= best:
            chosen, best = [*chosen, p], score
    assert report["members"] == chosen and best == greedy
