"""Sparse deltas on the real MiniLM-L6: file size at 1% density, save → load → apply, graft round trip.

The SST-2 accuracy comparison (LT-SFT 5% vs full fine-tuning) and the composition with a domain
delta are measured by ``bench/sparse_sst2.py`` (numbers in docs/benchmarks.md): they need
minutes of training, more than a test may take here.
"""
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.algebra.sparse import add_sparse, to_dense
from deltatune.core.inject import iter_wrappers
from deltatune.methods.sparse_core import SparseBranch, sparse_delta

pytestmark = pytest.mark.slow


def minilm():
    torch.manual_seed(0)
    return deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2).eval()


def test_minilm_sparse_delta_at_one_percent_is_small_and_round_trips(tmp_path):
    tok = deltatune.load_tokenizer("minilm-l6")
    enc = tok(["a gripping , funny film", "dull and far too long"], return_tensors="pt", padding=True)
    model = deltatune.attach(minilm(), {"method": "lt_sft", "density": 0.01, "modules_to_save": ["classifier"]}, name="task")
    model.attach({"method": "lt_sft", "density": 0.01, "seed": 7}, name="domain")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, w in iter_wrappers(model.base_model):
            for branch in w.deltas.values():
                if isinstance(branch, SparseBranch):
                    branch.sparse_values.copy_(torch.randn(branch.sparse_values.shape, generator=g) * 0.05)
    model.set_active(["task", "domain"])
    with torch.no_grad():
        both = model(**enc).logits
    model.save_delta(tmp_path / "task", name="task")
    model.save_delta(tmp_path / "domain", name="domain")

    # on disk: indices + values of 1% of each matrix, ≤ 3% of the targeted dense fp32 bytes (head excluded)
    dense = sum(w.base_layer.weight.numel() * 4 for _, w in iter_wrappers(model.base_model) if "domain" in w.deltas)
    size = (Path(tmp_path / "domain") / "adapter_model.safetensors").stat().st_size
    assert size <= 0.03 * dense, (size, dense)
    assert dense > 40e6  # every linear matrix of the 6 layers (+ pooler)

    # save → load → apply on a fresh model equals the trained one; the add_sparse sum is the same model
    fresh = deltatune.load_delta(minilm(), tmp_path / "task", name="task")
    deltatune.load_delta(fresh, tmp_path / "domain", name="domain")
    fresh.set_active(["task", "domain"])
    with torch.no_grad():
        assert (fresh(**enc).logits - both).abs().max() < 1e-5
    summed = add_sparse([sparse_delta(model, "task"), sparse_delta(model, "domain")])
    ref = minilm()
    with torch.no_grad():
        for name, (idx, val, shape) in summed.items():
            ref.get_parameter(name).add_(to_dense(idx, val, shape))
        head = dict(iter_wrappers(model.base_model))["classifier"].deltas["task"].modules_to_save
        ref.classifier.load_state_dict(head.state_dict())
        assert (ref(**enc).logits - both).abs().max() < 1e-5
