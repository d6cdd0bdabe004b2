"""The batched heterogeneous LoRA kernel against its plain per-row reference, on both paths:
the C++ BGMV kernel (few tokens per adapter, on a CPU) and the batched matmuls."""
from __future__ import annotations

import shutil

import pytest
import torch

from deltatune.serve import batched_lora
from deltatune.serve.batched_lora import add_batched_lora, lora_delta_reference, plan_lora
from deltatune.serve.cpu_kernel import bgmv_kernel


@pytest.fixture(autouse=True, params=["kernel", "matmul"])
def lora_path(request, monkeypatch):
    """Every test runs once through the kernel and once with the kernel unavailable (the fallback)."""
    if request.param == "matmul":
        monkeypatch.setattr(batched_lora, "bgmv_kernel", lambda: None)
    elif bgmv_kernel() is None:
        if (shutil.which("g++") or shutil.which("c++")) and shutil.which("ninja"):
            pytest.fail("a C++ compiler and ninja are installed but the CPU LoRA kernel did not build (see the log warning)")
        pytest.skip("no C++ compiler or no ninja: the CPU LoRA kernel cannot be built here")
    return request.param


def _stack(ranks, n_in, n_out, max_rank, seed=0):
    """Slots of different ranks zero-padded to max_rank, plus the unpadded factors."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(len(ranks), max_rank, n_in)
    Bt = torch.zeros(len(ranks), max_rank, n_out)
    raw = []
    for s, r in enumerate(ranks):
        a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
        A[s, :r], Bt[s, :r] = a, b.T
        raw.append((a, b))
    return A, Bt, raw


def test_matches_reference_and_unpadded_math_with_mixed_ranks():
    A, B, raw = _stack([2, 8, 5], 12, 7, 8)
    x = torch.randn(6, 3, 12)
    slots = torch.tensor([2, -1, 0, 1, 0, -1])
    base = torch.randn(6, 3, 7)
    y = add_batched_lora(base.clone(), x, A, B, slots)
    ref = base + lora_delta_reference(x, A, B, slots)
    assert torch.allclose(y, ref, atol=1e-5)
    # Padding is exact: row 0 (slot 2, rank 5) equals the unpadded rank-5 product.
    a, b = raw[2]
    assert torch.allclose(y[0], base[0] + x[0] @ a.T @ b.T, atol=1e-5)


def test_rows_without_adapter_are_untouched_bit_for_bit():
    A, B, _ = _stack([4, 4], 8, 8, 4)
    x, base = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    y = add_batched_lora(base.clone(), x, A, B, torch.tensor([-1, 1, -1, 0]))
    assert torch.equal(y[0], base[0]) and torch.equal(y[2], base[2])
    assert not torch.allclose(y[1], base[1])
    none = base.clone()
    assert torch.equal(add_batched_lora(none, x, A, B, torch.full((4,), -1)), base)


def test_all_rows_with_adapters_and_2d_input():
    A, B, _ = _stack([3, 6, 1], 10, 5, 6, seed=1)
    x, base = torch.randn(5, 10), torch.randn(5, 5)
    slots = torch.tensor([0, 1, 2, 1, 0])
    y = add_batched_lora(base.clone(), x, A, B, slots)
    assert y.shape == (5, 5)
    assert torch.allclose(y, base + lora_delta_reference(x, A, B, slots), atol=1e-5)


def test_same_adapter_for_every_row_equals_a_plain_lora_linear():
    A, B, raw = _stack([4], 8, 6, 4, seed=2)
    x = torch.randn(3, 5, 8)
    y = add_batched_lora(torch.zeros(3, 5, 6), x, A, B, torch.zeros(3, dtype=torch.long))
    a, b = raw[0]
    assert torch.allclose(y, x @ a.T @ b.T, atol=1e-5)


def test_a_shared_plan_gives_the_same_result_and_none_means_no_adapter():
    A, B, _ = _stack([4, 2, 3], 6, 5, 4, seed=3)
    x, base = torch.randn(5, 4, 6), torch.randn(5, 4, 5)
    slots = torch.tensor([1, 1, -1, 2, 1])
    plan = plan_lora(slots, 4)
    assert (plan.lo, plan.hi, plan.width) == (1, 2, 12)  # slot 1 has 3 rows × 4 tokens
    y = add_batched_lora(base.clone(), x, A, B, slots, plan)
    assert torch.allclose(y, base + lora_delta_reference(x, A, B, slots), atol=1e-5)
    assert plan_lora(torch.tensor([-1, -1]), 3) is None


def test_dense_layouts_match_the_reference():
    A, B, _ = _stack([4, 2, 3], 6, 5, 4, seed=4)
    for slots, dense, identity in [([0, 0, 0, 0], True, True), ([0, 1, 2], True, True), ([2, 0, 1, 2, 0, 1], True, False),
                                   ([1, 1, -1, 2, 2], True, False), ([0, 1, 1], False, True)]:
        slots = torch.tensor(slots)
        for t in (1, 3):
            x, base = torch.randn(len(slots), t, 6), torch.randn(len(slots), t, 5)
            plan = plan_lora(slots, t)
            assert plan.dense == dense and (plan.perm is None) == identity
            y = add_batched_lora(base.clone(), x, A, B, slots, plan)
            assert torch.allclose(y, base + lora_delta_reference(x, A, B, slots), atol=1e-5)


@pytest.mark.parametrize("n_in,n_out,ranks", [(48, 32, [4, 8, 5]), (37, 23, [3, 1, 6])])  # AVX-512 blocks; odd tails
def test_bf16_weights_under_fp32_activations_match_the_upcast_reference(n_in, n_out, ranks):
    A, B, _ = _stack(ranks, n_in, n_out, max(ranks), seed=5)
    A16, B16 = A.bfloat16(), B.bfloat16()
    for slots, t in [([2, -1, 0, 1, 0], 1), ([1, 1, -1, 2, 0], 2), ([0] * 6, 1), ([1, 1, -1, 2, 2, 0], 4)]:
        slots = torch.tensor(slots)
        x, base = torch.randn(len(slots), t, n_in), torch.randn(len(slots), t, n_out)
        y = add_batched_lora(base.clone(), x, A16, B16, slots)
        assert y.dtype == torch.float32
        # Exactly the fp32 math on the bf16-rounded weights: only the weights' rounding differs from fp32.
        assert torch.allclose(y, base + lora_delta_reference(x, A16.float(), B16.float(), slots), atol=1e-5)
        assert torch.equal(y[slots < 0], base[slots < 0])


def test_kernel_serves_decode_shaped_batches_and_matmuls_serve_prefill(lora_path, monkeypatch):
    calls = []
    real = batched_lora.bgmv_kernel

    def spy():
        k = real()
        if k is None:
            return None
        calls.append(1)
        return k
    monkeypatch.setattr(batched_lora, "bgmv_kernel", spy)
    A, B, _ = _stack([4, 4], 16, 16, 4)
    add_batched_lora(torch.zeros(4, 1, 16), torch.randn(4, 1, 16), A, B, torch.tensor([0, 1, 0, 1]))  # 2 tokens per adapter
    decode_calls = len(calls)
    add_batched_lora(torch.zeros(2, 16, 16), torch.randn(2, 16, 16), A, B, torch.tensor([0, 1]))  # 16 tokens per adapter
    assert decode_calls == (1 if lora_path == "kernel" else 0) and len(calls) == decode_calls
