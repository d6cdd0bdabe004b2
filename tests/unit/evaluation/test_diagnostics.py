"""Weight-space diagnostics against direct computations."""
import math

import pytest
import torch

import deltatune
from deltatune.evaluation.diagnostics import delta_pairs, diagnose, effective_rank, full_finetune_pairs, matrix_diagnostics
from tests.helpers import randomize_delta


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    p = torch.tensor([2.0, 1.0]) / 3
    assert effective_rank(torch.tensor([2.0, 1.0])) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.zeros(3)) == 0.0


def test_intruders_count_new_directions_not_rotations_of_old_ones():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    s = torch.linspace(10, 1, 16)
    w = u @ torch.diag(s) @ v.T
    # Scaling W's own singular values moves no singular vector: no intruders.
    assert matrix_diagnostics(w, u @ torch.diag(0.3 * s) @ v.T, top_k=5)["intruders"] == 0
    # A large rank-1 update along a direction orthogonal-ish to the top of W's spectrum becomes the top
    # singular vector of W', far from every base direction that carries weight: one intruder at ε = 0.5.
    x = torch.randn(16, generator=g)
    x -= u[:, :8] @ (u[:, :8].T @ x)
    x = x / x.norm()
    y = torch.randn(16, generator=g)
    delta = 50 * torch.outer(x, y / y.norm())
    row = matrix_diagnostics(w, delta, top_k=1, threshold=0.9)
    assert row["effective_rank"] == pytest.approx(1.0, abs=1e-4) and row["norm"] == pytest.approx(50.0)
    assert row["intruders"] == 1
    assert matrix_diagnostics(w, delta * 1e-3, top_k=1, threshold=0.9)["intruders"] == 0  # too small to move W's top direction


def test_delta_pairs_use_each_methods_delta_weight(tiny_llama):
    model = deltatune.attach(tiny_llama, {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]})
    randomize_delta(model, std=0.3)
    result = diagnose(delta_pairs(model))
    assert len(result["modules"]) == 4 and result["skipped"] == []
    for module, row in result["modules"].items():
        wrapper = dict(model.base_model.named_modules())[module]
        expected = wrapper.deltas["default"].delta_weight(wrapper.base_layer)
        assert row["norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
        assert row["effective_rank"] <= 2.0 + 1e-6  # a rank-2 update
    assert set(result["summary"]["norm_per_layer"]) == {"0", "1"}


def test_non_linear_deltas_are_skipped(tiny_llama):
    model = deltatune.attach(tiny_llama, {"method": "bottleneck", "targets": ["mlp"]}) if "bottleneck" in deltatune.list_methods() else None
    if model is None:
        pytest.skip("no bottleneck method registered")
    result = diagnose(delta_pairs(model))
    assert result["modules"] == {} and result["skipped"]


def test_full_finetune_pairs_skip_embeddings_and_heads():
    base = {"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.q.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(4, 2),
            "model.norm.weight": torch.zeros(2)}
    tuned = {k: v + 1 for k, v in base.items()}
    pairs = list(full_finetune_pairs(base, tuned))
    assert [p[0] for p in pairs] == ["model.layers.0.q"] and torch.equal(pairs[0][2], torch.ones(2, 2))
