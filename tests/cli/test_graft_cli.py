"""``deltatune graft`` in a subprocess: accuracy kept vs density (JSON + PNG), the saved sparse delta, one-line errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch

import deltatune
from tests.helpers import WORDS, save_tiny_bert, save_tiny_lm


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, timeout=timeout, env=env)


def make_task(path, n=96, seed=0):
    """Sentences of random words; label 1 iff "cat" occurs (learnable by a tiny BERT in a few steps)."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w != "cat"]
    rows = []
    for i in range(n):
        sent = [rng.choice(words) for _ in range(6)]
        if i % 2:
            sent[rng.randrange(6)] = "cat"
        rows.append((" ".join(sent), i % 2))
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return rows


def accuracy(model, tokenizer, rows):
    enc = tokenizer([s for s, _ in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor([y for _, y in rows])).float().mean())


def finetune(base_dir, out_dir, rows):
    tokenizer = deltatune.load_tokenizer(base_dir)
    torch.manual_seed(0)
    model = deltatune.load_model(base_dir, task="sequence-classification", num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    enc = tokenizer([s for s, _ in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([y for _, y in rows])
    for _ in range(40):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def test_graft_reports_accuracy_kept_vs_density_and_saves_the_delta(tmp_path):
    base = save_tiny_bert(tmp_path / "base")
    rows = make_task(tmp_path / "dev.tsv")
    ft, tokenizer = finetune(base, tmp_path / "ft", rows)
    ft_acc = accuracy(ft, tokenizer, rows)
    assert ft_acc >= 0.9

    out = tmp_path / "graft"
    r = cli("graft", "--base", str(base), "--finetuned", str(tmp_path / "ft"), "--data", str(tmp_path / "dev.tsv"),
            "--task", "sequence-classification", "--densities", "0.01,0.1,0.5,1", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report == {**json.loads((out / "graft_report.json").read_text()), "out": str(out), "delta": str(out / "delta"), "plot": str(out / "graft_curve.png")}
    assert report["metric"] == "accuracy" and report["modules_to_save"] == ["classifier"]
    assert abs(report["finetuned_metrics"]["accuracy"] - ft_acc) < 1e-9
    curve = report["densities"]
    assert [c["density"] for c in curve] == [0.01, 0.1, 0.5, 1.0]
    # the share of the matrices' ||Δθ||² kept grows with density and is all of it at density 1 (biases, norms and
    # embeddings are not grafted, so the accuracy there need not be the fine-tuned one)
    assert all(a["change_kept"] < b["change_kept"] for a, b in zip(curve, curve[1:])) and abs(curve[-1]["change_kept"] - 1) < 1e-6
    assert all(abs(c["kept"] - c["metric"] / ft_acc) < 1e-9 for c in curve)
    assert curve[-1]["metric"] > report["base_metrics"]["accuracy"]
    assert all(c["entries"] == c["sparse_bytes"] // 8 for c in curve) and curve[0]["entries"] < curve[1]["entries"]
    assert (out / "graft_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved delta: the smallest density keeping >= 99% of the fine-tuned accuracy, an lt_sft delta with the head in full
    saved = report["saved_density"]
    good = [c["density"] for c in curve if c["kept"] >= 0.99]
    assert saved == (min(good) if good else max(curve, key=lambda c: c["kept"])["density"])
    model = deltatune.load_delta(deltatune.load_model(base, task="sequence-classification", num_labels=2), out / "delta")
    assert model.delta_configs["default"].method == "lt_sft" and model.delta_configs["default"].density == saved
    assert accuracy(model, tokenizer, rows) == next(c["metric"] for c in curve if c["density"] == saved)


def test_graft_errors_are_one_line_and_write_nothing(tmp_path):
    base = save_tiny_lm(tmp_path / "base")
    other = tmp_path / "other"
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_llama_config, tiny_tokenizer
    tok = tiny_tokenizer()
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), intermediate_size=48)).save_pretrained(other)
    tok.save_pretrained(other)

    r = cli("graft", "--base", str(base), "--finetuned", str(other), "--densities", "0,0.5", "--out", str(tmp_path / "o1"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: graft: densities must be in (0, 1], got 0.0"]
    r = cli("graft", "--base", str(base), "--finetuned", str(other), "--densities", "0.5", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "mlp.gate_proj.weight" in r.stderr and "is [48, 32] in the fine-tuned model but [64, 32] in the base" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
