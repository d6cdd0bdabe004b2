"""Merge ops against naive element-by-element references."""
from __future__ import annotations

import pytest
import torch

from deltatune.algebra.lines import lines_factor
from deltatune.algebra.ops import OpParams, generalized_task_arithmetic, get_op, magnitude_mask
from deltatune.utils.errors import ConfigError
from tests.unit.algebra.helpers_algebra import naive_ties


def test_ties_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    tasks = [torch.randn(6, 5, generator=g) for _ in range(3)]
    p = OpParams(weights=(1.0, 0.5, 2.0), densities=(0.4,) * 3, sparsify="magnitude", consensus="sum", normalize=True)
    got = generalized_task_arithmetic(None, tasks, p)
    assert torch.allclose(got, naive_ties(tasks, [1.0, 0.5, 2.0], 0.4), atol=1e-6)


def test_ties_density_one_agreeing_signs_is_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    sign = torch.randn(8, 8, generator=g).sign()
    tasks = [torch.rand(8, 8, generator=g) * sign for _ in range(3)]
    w = (0.2, 0.3, 0.5)  # sums to 1: the TIES mean equals the weighted sum
    ties = generalized_task_arithmetic(None, tasks, OpParams(weights=w, densities=(1.0,) * 3, sparsify="magnitude", consensus="sum", normalize=True))
    ta = generalized_task_arithmetic(None, tasks, OpParams(weights=w))
    assert torch.allclose(ties, ta, atol=1e-6)
    assert torch.allclose(ta, sum(wi * t for wi, t in zip(w, tasks)), atol=1e-6)


def test_dare_keeps_expected_value_and_is_seeded():
    t = torch.ones(200, 200)
    p = OpParams(weights=(1.0,), densities=(0.3,), sparsify="random", generator=torch.Generator().manual_seed(5))
    out = generalized_task_arithmetic(None, [t], p)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.3))  # survivors rescaled by 1/d
    assert abs(out.mean().item() - 1.0) < 0.05
    again = generalized_task_arithmetic(None, [t], OpParams(weights=(1.0,), densities=(0.3,), sparsify="random", generator=torch.Generator().manual_seed(5)))
    assert torch.equal(out, again)


def test_magnitude_mask_keeps_top_k():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2])
    assert magnitude_mask(t, 0.4).tolist() == [False, True, False, True, False]


def test_linear_is_weighted_average():
    a, b = torch.randn(4), torch.randn(4)
    out = get_op("linear").fn(None, [a, b], OpParams(weights=(1.0, 3.0), normalize=True))
    assert torch.allclose(out, (a + 3 * b) / 4, atol=1e-6)


def test_unknown_op_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        get_op("tie")


def test_lines_factors():
    assert lines_factor("model.layers.0.mlp.up_proj.weight", 4, 0.2, 0.8) == pytest.approx(0.2)
    assert lines_factor("model.layers.3.mlp.up_proj.weight", 4, 0.2, 0.8) == pytest.approx(1.0)
    assert lines_factor("encoder.layer.1.output.dense.weight", 3, 0.0, 1.0) == pytest.approx(0.5)
    assert lines_factor("model.embed_tokens.weight", 4, 0.2, 0.8) == pytest.approx(0.2)
    assert lines_factor("lm_head.weight", 4, 0.2, 0.8) == pytest.approx(1.0)


def test_magnitude_mask_equals_argsort_selection_with_and_without_ties():
    for t in (torch.randn(1000, generator=torch.Generator().manual_seed(3)), torch.tensor([1.0, -1.0, 1.0, 0.5, 2.0, -1.0])):
        for density in (0.1, 0.5, 0.34):
            k = max(1, int(density * t.numel()))
            want = torch.zeros(t.numel(), dtype=torch.bool)
            want[torch.argsort(t.abs(), descending=True)[:k]] = True
            assert torch.equal(magnitude_mask(t, density), want)
