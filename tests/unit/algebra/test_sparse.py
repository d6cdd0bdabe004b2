"""Sparse deltas: written by a merge, added across tasks, merged as inputs."""
from __future__ import annotations

import pytest
import torch

from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import parse_recipe
from deltatune.algebra.sparse import add_sparse, read_sparse, to_dense, write_sparse
from deltatune.utils.errors import ShapeMismatchError
from tests.helpers import save_tiny_lm
from tests.unit.algebra.helpers_algebra import make_checkpoints, weights


def merge(base, inputs, out, method="task_arithmetic", **output):
    return run_merge(parse_recipe({"base": str(base), "inputs": [{"path": str(p), "weight": w} for p, w in inputs], "method": method,
                                   "output": {"path": str(out), **output}}))


def test_language_plus_task_sparse_deltas(tmp_path):
    base, (lang, task) = make_checkpoints(tmp_path, n=2)
    r = merge(base, [(lang, 1.0)], tmp_path / "lang", format="sparse", density=0.1)
    assert r["format"] == "sparse" and 0.09 < r["density"] <= 0.1
    merge(base, [(task, 1.0)], tmp_path / "task", format="sparse", density=0.1)
    a, b = read_sparse(tmp_path / "lang"), read_sparse(tmp_path / "task")
    bw, lw = weights(base), weights(lang)
    name = "model.layers.1.mlp.down_proj.weight"
    dense_a = to_dense(*a[name])
    # The stored entries are exactly the top-10% of |τ| of that tensor.
    tau = lw[name] - bw[name]
    assert (dense_a != 0).sum() == int(0.1 * tau.numel())
    assert torch.allclose(dense_a[dense_a != 0], tau[dense_a != 0], atol=1e-7)
    assert (tau[dense_a == 0].abs().max() <= tau[dense_a != 0].abs().min())
    # Adding: the union of indices, overlapping values summed.
    both = add_sparse([a, b], [1.0, 0.5])
    for n in a:
        assert torch.allclose(to_dense(*both[n]), to_dense(*a[n]) + 0.5 * to_dense(*b[n]), atol=1e-7)
    write_sparse(tmp_path / "sum", both, str(base))
    # Sparse deltas are merge inputs: base + δ_lang + 0.5 δ_task, same as applying the added delta.
    merge(base, [(tmp_path / "lang", 1.0), (tmp_path / "task", 0.5)], tmp_path / "m1")
    merge(base, [(tmp_path / "sum", 1.0)], tmp_path / "m2")
    m1, m2 = weights(tmp_path / "m1"), weights(tmp_path / "m2")
    for n in bw:
        want = bw[n] + (to_dense(*both[n]) if n in both else 0)
        assert torch.allclose(m1[n], want, atol=1e-6) and torch.allclose(m2[n], want, atol=1e-6)


def test_sparse_delta_for_another_base_is_refused(tmp_path):
    base, (ft,) = make_checkpoints(tmp_path, n=1)
    merge(base, [(ft, 1.0)], tmp_path / "d", format="sparse", density=0.5)
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_llama_config
    other = tmp_path / "other"
    save_tiny_lm(other)
    LlamaForCausalLM(tiny_llama_config(intermediate_size=48, vocab_size=weights(base)["model.embed_tokens.weight"].shape[0])).save_pretrained(other)
    with pytest.raises(ShapeMismatchError, match="has shape"):
        merge(other, [(tmp_path / "d", 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
