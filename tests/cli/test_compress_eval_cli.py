"""``deltatune compress --model M --data FILE``: the report's size ratio and metrics before / after,
checked against an evaluation that shares no code with the CLI's (plain transformers forward,
and a ComPEFT compression written out by hand from the paper's definition)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import deltatune
from tests.cli.test_cli import cli
from tests.helpers import WORDS, tiny_bert_config, tiny_tokenizer

POSITIVE = {"cat", "dog"}


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Random word strings; label 1 iff one of them names an animal (a rule a tiny BERT learns quickly)."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in POSITIVE]
    rows = []
    for i in range(n):
        words = rng.sample(plain, rng.randint(3, 7))
        if i % 2:
            words[rng.randrange(len(words))] = rng.choice(sorted(POSITIVE))
        rows.append((" ".join(words), int(bool(POSITIVE & set(words)))))
    return rows


def write_tsv(path, rows) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT classifier directory, a LoRA adapter (+ head) trained on the rule, and eval data."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("compress_eval")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(vocab_size=len(tok), pad_token_id=0, num_labels=2)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    dm = deltatune.attach(deltatune.load_model(root / "model", task="sequence-classification", num_labels=2),
                          {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear", "modules_to_save": ["classifier"]})
    train = sentences(256, seed=1)
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    g = random.Random(0)
    dm.train()
    for _ in range(60):
        batch = g.sample(train, 32)
        enc = tok([s for s, _ in batch], padding=True, return_tensors="pt")
        loss = F.cross_entropy(dm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, torch.tensor([y for _, y in batch]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    dm.save_delta(str(root / "lora"))
    return root, write_tsv(root / "eval.tsv", sentences(96, seed=2))


@torch.no_grad()
def independent_metrics(model_dir, adapter, data) -> dict[str, float]:
    """Accuracy and mean cross-entropy with a model from transformers itself plus the adapter."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = deltatune.load_delta(BertForSequenceClassification.from_pretrained(model_dir), adapter).eval()
    rows = [line.split("\t") for line in open(data).read().splitlines()[1:]]
    enc = tok([s for s, _ in rows], padding=True, return_tensors="pt")
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    labels = torch.tensor([int(y) for _, y in rows])
    return {"accuracy": int((logits.argmax(-1) == labels).sum()) / len(rows), "loss": F.cross_entropy(logits, labels).item()}


def compeft_by_hand(adapter, out, density: float) -> None:
    """The adapter with every LoRA tensor replaced by ComPEFT's dense result, written as a plain LoRA
    directory: keep the top-⌊d·n⌋ |entries|, each kept one becomes sign × mean |kept| (the head stays)."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for key, t in tensors.items():
        if "lora_" not in key:
            continue
        flat = t.reshape(-1).float()
        k = max(1, int(density * flat.numel()))
        idx = flat.abs().topk(k).indices
        dense = torch.zeros_like(flat)
        dense[idx] = flat[idx].sign() * flat[idx].abs().mean()
        tensors[key] = dense.view(t.shape).to(t.dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_compress_reports_size_ratio_and_metrics_matching_an_independent_eval(trained, tmp_path):
    root, data = trained
    model_dir, adapter, out, density = root / "model", root / "lora", tmp_path / "small", 0.3
    r = cli("compress", str(adapter), "--density", str(density), "--out", str(out), "--model", str(model_dir), "--data", data,
            "--task", "sequence-classification", "--num-labels", "2", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)

    # Size: the ratio of the two weight files as they are on disk.
    before, after = (adapter / "adapter_model.safetensors").stat().st_size, (out / "adapter_model.safetensors").stat().st_size
    assert (rep["bytes_before"], rep["bytes_after"]) == (before, after)
    assert rep["size_ratio"] == pytest.approx(after / before) and 0 < rep["size_ratio"] < 1
    assert 0 < rep["tensor_bytes_ratio"] < rep["size_ratio"]  # the header (tensor names) is most of a tiny file

    # Metrics: real numbers, equal to an evaluation of the original and of a by-hand compression.
    want_before = independent_metrics(model_dir, adapter, data)
    compeft_by_hand(adapter, tmp_path / "by_hand", density)
    want_after = independent_metrics(model_dir, tmp_path / "by_hand", data)
    assert independent_metrics(model_dir, out, data) == pytest.approx(want_after, abs=1e-5)  # the written delta is that compression
    for key, want in (("metrics_before", want_before), ("metrics_after", want_after)):
        got = rep[key]
        assert all(isinstance(got[m], float) and got[m] == got[m] for m in ("accuracy", "loss")), got
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), key
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), key
    assert want_before["accuracy"] >= 0.9  # the adapter learned the rule: "before" is a trained model, not chance
    assert want_before["loss"] != pytest.approx(want_after["loss"], abs=1e-4)  # compression changed the model: two evaluations
    kept = rep["kept"]
    assert kept["metric"] == "accuracy" and (kept["before"], kept["after"]) == (rep["metrics_before"]["accuracy"], rep["metrics_after"]["accuracy"])
    assert kept["ratio"] == pytest.approx(kept["after"] / kept["before"])

    # The human-readable line carries the same numbers.
    r = cli("compress", str(adapter), "--density", str(density), "--out", str(tmp_path / "again"), "--model", str(model_dir), "--data", data,
            "--task", "sequence-classification", "--num-labels", "2")
    assert r.returncode == 0, r.stderr
    assert f"size ratio {rep['size_ratio']:.4f}" in r.stdout and f"accuracy {kept['before']:.4f} -> {kept['after']:.4f}" in r.stdout


@pytest.mark.parametrize("given", ["--model", "--data"])
def test_model_and_data_go_together(trained, tmp_path, given):
    root, data = trained
    value = str(root / "model") if given == "--model" else data
    out = tmp_path / "small"
    r = cli("compress", str(root / "lora"), "--density", "0.1", "--out", str(out), given, value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "--model and --data go together" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()  # checked before anything is compressed or written
