"""The pseudo-label warm-up as four commands on a tiny BERT: train on labels → ``deltatune label`` the
pool → warm up on the pseudo-labels → continue that delta on the labels (``model.adapter``)."""
from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

import deltatune
from tests.cli.test_graft_cli import cli, make_task
from tests.helpers import save_tiny_bert


def recipe(tmp_path, name, data, steps=30, **extra):
    body = {
        "model": {"name": str(tmp_path / "bert"), "task": "sequence-classification"},
        "delta": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
        "data": {"path": str(data), "max_length": 16},
        "optim": {"lr": 5e-3},
        "train": {"max_steps": steps, "batch_size": 16, "log_every": 10, "progress": False},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    for key, value in extra.items():
        body[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def predictions(tmp_path, adapter, sentences):
    tokenizer = deltatune.load_tokenizer(str(tmp_path / "bert"))
    model = deltatune.load_delta(deltatune.load_model(str(tmp_path / "bert"), task="sequence-classification", num_labels=2), adapter).eval()
    with torch.no_grad():
        probs = model(**tokenizer(sentences, return_tensors="pt", padding=True)).logits.softmax(-1)
    return probs.argmax(-1).tolist(), probs.max(-1).values.tolist()


def test_pseudo_label_warmup_in_four_commands(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    make_task(tmp_path / "labelled.tsv", n=64, seed=0)
    pool_rows = make_task(tmp_path / "pool_with_labels.tsv", n=80, seed=1)
    (tmp_path / "pool.tsv").write_text("sentence\n" + "".join(f"{s}\n" for s, _ in pool_rows))  # no labels

    done = cli("train", str(recipe(tmp_path, "stage1", tmp_path / "labelled.tsv")))
    assert done.returncode == 0, done.stderr[-2000:]
    stage1 = tmp_path / "runs" / "stage1" / "adapter"

    out = tmp_path / "pseudo.jsonl"
    done = cli("label", "--model", str(tmp_path / "bert"), "--adapter", str(stage1), "--data", str(tmp_path / "pool.tsv"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["pool"] == report["kept"] == len(rows) == 80
    labels, confidence = predictions(tmp_path, stage1, [s for s, _ in pool_rows])
    assert [r["label"] for r in rows] == labels  # the stage-1 model's argmax, row by row in pool order
    assert all(abs(r["confidence"] - c) < 1e-5 and c >= 0.5 for r, c in zip(rows, confidence))
    assert [r["text"] for r in rows] == [s for s, _ in pool_rows]
    assert sum(report["labels"].values()) == 80

    confident = tmp_path / "confident.jsonl"
    threshold = sorted(confidence)[40]  # about half the pool is at least this sure
    done = cli("label", "--model", str(tmp_path / "bert"), "--adapter", str(stage1), "--data", str(tmp_path / "pool.tsv"), "--out", str(confident),
               "--min-confidence", str(threshold))
    kept = [json.loads(line) for line in confident.read_text().splitlines()]
    assert 0 < len(kept) < 80 and all(r["confidence"] >= threshold - 1e-6 for r in kept)

    done = cli("train", str(recipe(tmp_path, "warmup", out)))
    assert done.returncode == 0, done.stderr[-2000:]
    warm = tmp_path / "runs" / "warmup" / "adapter"

    # Stage 4 continues the warm-up delta: with a vanishing learning rate one step leaves it as it was,
    # so the run really started from the warm-up's weights (and its head), not from a fresh delta.
    tiny_lr = recipe(tmp_path, "finetune", tmp_path / "labelled.tsv", steps=1, optim={"lr": 1e-12})
    body = yaml.safe_load(tiny_lr.read_text())
    del body["delta"]
    body["model"]["adapter"] = str(warm)
    tiny_lr.write_text(yaml.safe_dump(body))
    done = cli("train", str(tiny_lr))
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = load_file(str(warm / "adapter_model.safetensors")), load_file(str(tmp_path / "runs" / "finetune" / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any("classifier" in k for k in after)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in before.items() if "lora_B" in k)  # the warm-up's delta is not zero


def test_label_and_adapter_errors_are_one_line(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    make_task(tmp_path / "labelled.tsv", n=32, seed=0)
    done = cli("train", str(recipe(tmp_path, "stage1", tmp_path / "labelled.tsv", steps=2)))
    assert done.returncode == 0, done.stderr[-2000:]
    stage1 = str(tmp_path / "runs" / "stage1" / "adapter")

    (tmp_path / "pool.jsonl").write_text('{"text": "a cat sat"}\n{"body": "no text here"}\n')
    done = cli("label", "--model", str(tmp_path / "bert"), "--adapter", stage1, "--data", str(tmp_path / "pool.jsonl"), "--out", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2 and "pool.jsonl:2" in done.stderr and "'text'" in done.stderr
    assert not (tmp_path / "x.jsonl").exists()
    (tmp_path / "empty.jsonl").write_text("")
    done = cli("label", "--model", str(tmp_path / "bert"), "--adapter", stage1, "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2 and "empty" in done.stderr
    done = cli("label", "--model", str(tmp_path / "bert"), "--adapter", stage1, "--data", str(tmp_path / "pool.jsonl"), "--out", str(tmp_path / "x.jsonl"),
               "--min-confidence", "1.5")
    assert done.returncode == 2 and "--min-confidence" in done.stderr

    both = recipe(tmp_path, "both", tmp_path / "labelled.tsv", steps=1)
    body = yaml.safe_load(both.read_text())
    body["model"]["adapter"] = stage1
    both.write_text(yaml.safe_dump(body))
    done = cli("train", str(both))
    assert done.returncode == 2 and "model.adapter" in done.stderr and "delta" in done.stderr
