"""TIES is bit-identical to mergekit's on three tiny llama checkpoints.

mergekit pins transformers 4.x, so it runs in the peers' venv (``make peers``) in a subprocess, as
``bench/merge.py`` runs it on SmolLM2; without that venv the test skips and says so.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import load_merge_recipe
from tests.unit.algebra.helpers_algebra import make_checkpoints, weights

PEERS_PY = Path(__file__).resolve().parents[2] / ".venv-peers" / "bin" / "python"


@pytest.mark.skipif(not PEERS_PY.exists(), reason="mergekit lives in .venv-peers: run 'make peers' to compare with it")
@pytest.mark.parametrize("density", [0.5, 0.2])
def test_ties_equals_mergekit_bit_for_bit(tmp_path, density):
    base, fts = make_checkpoints(tmp_path)
    coefficients = [1.0, 0.7, 0.4]
    theirs = tmp_path / "mergekit.yaml"
    theirs.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32", "parameters": {"normalize": True, "int8_mask": False},
        "models": [{"model": str(p), "parameters": {"weight": w, "density": density}} for p, w in zip(fts, coefficients)]}))
    r = subprocess.run([str(PEERS_PY), "-m", "mergekit.scripts.run_yaml", str(theirs), str(tmp_path / "out-mergekit"), "--quiet",
                        "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = tmp_path / "ours.yaml"
    ours.write_text(yaml.safe_dump({"base": str(base), "method": "ties", "parameters": {"density": density},
                                    "inputs": [{"path": str(p), "weight": w} for p, w in zip(fts, coefficients)],
                                    "output": {"path": str(tmp_path / "out-deltatune"), "dtype": "float32"}}))
    run_merge(load_merge_recipe(ours), log=lambda *a: None)
    mine = weights(tmp_path / "out-deltatune")
    reference = {k: v for f in sorted((tmp_path / "out-mergekit").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(mine) == set(reference)
    assert all(torch.equal(mine[k], reference[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], reference[k])][:5]
    assert any(not torch.equal(mine[k], weights(base)[k]) for k in mine)  # the merge did change the model
