"""Real MiniLM-L6 embeddings on real AG News text: GOT-D moves toward the target topic."""
from __future__ import annotations

import csv

import pytest

from deltatune.select import run_selection
from tests.helpers import SHARED_DATA
from tests.unit.select.helpers import recipe, write_jsonl

AG = SHARED_DATA / "ag_news"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (AG / "test.tsv").exists(), reason="../shared/data/ag_news is not present")]


def _rows(name: str) -> list[dict]:
    with open(AG / name, encoding="utf-8", newline="") as f:
        return [{"text": t, "label": y} for t, y in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def test_got_d_with_minilm_selects_the_target_topic(tmp_path):
    rows = _rows("test.tsv")
    per_class: dict[str, list[dict]] = {}
    for r in rows:
        if len(per_class.setdefault(r["label"], [])) < 50:
            per_class[r["label"]].append(r)
    pool_rows = [r for group in per_class.values() for r in group]  # 200 rows, 25% Sports
    pool = write_jsonl(tmp_path / "pool.jsonl", pool_rows)
    target = write_jsonl(tmp_path / "target.jsonl", [r for r in _rows("train_subset.tsv") if r["label"] == "Sports"][:20])
    r = recipe(tmp_path, {"name": "got_d"}, pool, target={"path": str(target)}, budget=40,
               embedding={"model": "minilm-l6", "cache_dir": str(tmp_path / "cache")})
    result = run_selection(r)
    picked = [pool_rows[i]["label"] for i in result.selection.indices]
    assert picked.count("Sports") >= 32, picked  # >= 80% of the selection vs 25% of the pool
    assert result.embeddings_computed == 220
