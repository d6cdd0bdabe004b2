"""``deltatune merge`` / ``deltatune compress`` in a subprocess: outputs, reports, one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

import deltatune
from tests.helpers import randomize_delta
from tests.unit.algebra.helpers_algebra import make_checkpoints, naive_ties, weights, write_recipe


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_merge_and_compress_commands(tmp_path):
    base, fts = make_checkpoints(tmp_path, n=2)
    recipe = write_recipe(tmp_path / "m.yaml", {
        "base": str(base), "inputs": [{"path": str(p), "weight": 0.5} for p in fts], "method": "ties",
        "parameters": {"density": 0.5}, "output": {"path": str(tmp_path / "merged")},
    })
    r = cli("merge", str(recipe), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["method"] == "ties" and report["tensors_changed"] == len(weights(base))
    b, f, merged = weights(base), [weights(p) for p in fts], weights(tmp_path / "merged")
    assert merged.keys() == b.keys()
    for k in b:  # base + TIES of the task vectors, computed element by element
        want = b[k] + naive_ties([f[0][k] - b[k], f[1][k] - b[k]], [0.5, 0.5], 0.5)
        assert torch.allclose(merged[k], want, atol=1e-6), k

    dm = deltatune.attach(deltatune.load_model(base), {"method": "lora", "r": 4, "targets": "all-linear"})
    randomize_delta(dm, std=0.1)
    dm.save_delta(str(tmp_path / "lora"))
    r = cli("compress", str(tmp_path / "lora"), "--density", "0.1", "--out", str(tmp_path / "small"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["bytes_after"] < rep["bytes_before"] and rep["tensor_bytes_ratio"] < 0.05
    # ComPEFT by hand: each tensor keeps its top 10 % |entries| as sign × their mean |value|.
    shutil.copytree(tmp_path / "lora", tmp_path / "by-hand")
    factors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for k, t in factors.items():
        flat = t.reshape(-1)
        top = flat.abs().argsort(descending=True)[: max(1, int(0.1 * flat.numel()))]
        kept = torch.zeros_like(flat)
        kept[top] = flat[top].sign() * flat[top].abs().mean()
        factors[k] = kept.view_as(t)
    save_file(factors, str(tmp_path / "by-hand" / "adapter_model.safetensors"))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        got = deltatune.load_delta(deltatune.load_model(base), tmp_path / "small")(input_ids=ids).logits
        want = deltatune.load_delta(deltatune.load_model(base), tmp_path / "by-hand")(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-6


def test_bad_inputs_one_line_errors_and_no_output(tmp_path):
    base, fts = make_checkpoints(tmp_path, n=2)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "m.yaml", {
        "base": str(base), "inputs": [{"path": str(fts[0]), "weight": 1.0}, {"path": str(fts[1]), "weight": -1.0}],
        "method": "ties", "output": {"path": str(out)},
    })
    r = cli("merge", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "weights sum to 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("compress", str(fts[0]), "--density", "1.5", "--out", str(out))
    assert r.returncode == 2 and "density must be in (0, 1]" in r.stderr
    assert not out.exists()
