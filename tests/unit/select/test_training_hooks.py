"""The training-time options wired into recipes: train.token_selection and data.augment."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune.data import DataConfig, build_datasets
from deltatune.select.token_select import TokenSelector
from deltatune.train.config import load_recipe
from deltatune.utils.errors import ConfigError
from tests.helpers import save_tiny_lm, tiny_tokenizer


def test_data_augment_multiplies_training_records_only(tmp_path):
    rows = [{"text": "the cat sat on the mat", "label": i % 2} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    plain = DataConfig(path=str(path), eval_fraction=0.2, max_length=32)
    aug = DataConfig(path=str(path), eval_fraction=0.2, max_length=32, augment={"copies": 2, "ops": ["swap", "delete"], "seed": 0})
    train0, eval0, _ = build_datasets(plain, tok, seed=0)
    train1, eval1, report = build_datasets(aug, tok, seed=0)
    assert len(train0) == 8 and len(train1) == 24 and report.train_examples == 24
    assert eval1 == eval0  # the held-out records are the same and never augmented
    assert [e["label"] for e in train1[8:]] == [e["label"] for e in train0 for _ in range(2)]
    assert any(len(e["input_ids"]) < len(train0[0]["input_ids"]) for e in train1[8:])  # deletions happened
    with pytest.raises(Exception, match="copies"):
        DataConfig(path=str(path), augment={"copies": 0})


def test_token_selection_trains_a_different_delta_and_needs_causal_lm(tmp_path):
    from deltatune.train.loop import train

    lm = save_tiny_lm(tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "one two three four five six seven eight nine"}) + "\n" for _ in range(16)))
    base = {"model": {"name": str(lm)}, "delta": {"method": "lora", "r": 2, "alpha": 4, "targets": "all-linear"},
            "data": {"path": str(data), "max_length": 32}, "optim": {"lr": 0.02},
            "train": {"max_steps": 4, "batch_size": 4, "progress": False}}
    plain = train(load_recipe(None, [f"output.dir={tmp_path}", "output.name=plain"], default=base))
    sel = train(load_recipe(None, [f"output.dir={tmp_path}", "output.name=sel", "train.token_selection.keep_ratio=0.3"], default=base))
    from safetensors.torch import load_file

    a = load_file(f"{plain['adapter']}/adapter_model.safetensors")
    b = load_file(f"{sel['adapter']}/adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # fewer target tokens per step → a different update
    with pytest.raises(ConfigError, match="token_selection .*needs model.task causal-lm"):
        load_recipe(None, ["train.token_selection.beta=0.9"], default={**base, "model": {"name": str(lm), "task": "sequence-classification"}})


def test_token_selector_keeps_the_requested_fraction(tiny_llama):
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    for p in tiny_llama.parameters():
        p.requires_grad_(p.dim() == 1)  # norms train; the history starts equal to them
    out = TokenSelector(tiny_llama, keep_ratio=0.5)(tiny_llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    kept = int((out["labels"] != -100).sum())
    assert kept == 8  # ceil(0.5 * 16 targets)
    assert torch.equal(out["labels"][out["labels"] != -100], ids[out["labels"] != -100])
