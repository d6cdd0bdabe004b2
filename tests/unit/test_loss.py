"""Chunked LM loss against the naive ``F.cross_entropy(hidden @ W.T)`` reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.train.loss import chunked_lm_loss, mean_lm_loss
from deltatune.utils.errors import ConfigError, DataError


def _inputs(B=3, T=9, H=16, V=50, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a "prompt"
    labels[2, 6:] = -100  # "padding"
    labels[1, 3] = -100
    return hidden, weight, b, labels


def _naive(hidden, weight, bias, labels):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradients_match_naive_fp32(chunk_size, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    loss, n_tokens = chunked_lm_loss(hidden, weight, labels, chunk_size=chunk_size, lm_head_bias=b)
    reference = _naive(hidden, weight, b, labels)
    assert n_tokens.item() == int((labels != -100).sum()) == 27 - 8
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(loss, (hidden, weight, b)), _grads(reference, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    hidden, weight, b, labels = _inputs(B=3, T=7, H=6, V=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: chunked_lm_loss(h, w, labels, chunk_size=3, lm_head_bias=bb)[0], (hidden, weight, b)
    )


def test_bf16_autocast_matches_naive_loosely():
    hidden, weight, b, labels = _inputs(H=32, V=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_lm_loss(hidden, weight, labels, chunk_size=5, lm_head_bias=b)
        reference = _naive(hidden, weight, b, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=1e-1)
    got, want = _grads(loss, (hidden, weight, b)), _grads(reference, (hidden, weight, b))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32  # grads come back in the parameters' dtype
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2)


def test_bf16_inputs_give_bf16_grads():
    hidden, weight, _, labels = _inputs(dtype=torch.bfloat16, bias=False)
    loss, _ = chunked_lm_loss(hidden, weight, labels, chunk_size=4)
    reference = _naive(hidden.float(), weight.float(), None, labels)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=1e-1)
    grad_h, grad_w = _grads(loss, (hidden, weight))
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16


def test_all_ignored_labels_give_zero_without_nan():
    hidden, weight, b, labels = _inputs()
    labels = torch.full_like(labels, -100)
    loss, n_tokens = chunked_lm_loss(hidden, weight, labels, lm_head_bias=b)
    assert loss.item() == 0.0 and n_tokens.item() == 0
    for grad in _grads(loss, (hidden, weight, b)):
        assert torch.count_nonzero(grad) == 0
    mean = mean_lm_loss(hidden, weight, labels, lm_head_bias=b)
    assert mean.item() == 0.0 and not torch.isnan(mean)


def test_mean_matches_cross_entropy_mean():
    hidden, weight, b, labels = _inputs()
    mean = mean_lm_loss(hidden, weight, labels, chunk_size=7, lm_head_bias=b)
    reference = F.cross_entropy((hidden @ weight.T + b).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(mean, reference, rtol=1e-5, atol=1e-6)


def test_frozen_lm_head_gives_only_hidden_grad():
    hidden, weight, _, labels = _inputs(bias=False)
    weight = weight.detach()  # LoRA: lm_head frozen, so no [V, H] gradient is ever built
    loss, _ = chunked_lm_loss(hidden, weight, labels, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(_naive(hidden, weight, None, labels), hidden)[0])


def test_saved_for_backward_is_far_below_full_logits():
    # Measured once on this 2-core CPU with ru_maxrss for B*T = 8*256, V = 49152, H = 576 (full
    # fp32 logits = 400 MB), forward + backward, peak RSS above the inputs / .grad buffers:
    #   naive F.cross_entropy: ~1180 MB;  chunk_size=1024: ~530 MB;  chunk_size=256: ~250 MB
    #   (of which 113 MB is the fp32 dL/dW accumulator; with a frozen lm_head: 1077 / 322 / 35 MB).
    # Here the deterministic part is checked: what autograd keeps between forward and backward —
    # the gradients w.r.t. the inputs, computed in forward (rows-sized, plus W-sized when W trains).
    N, H, V = 4 * 128, 64, 8192
    hidden = torch.randn(4, 128, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (4, 128))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_lm_loss(hidden, weight, labels, chunk_size=64)
    inputs = {hidden.data_ptr(), weight.data_ptr()}  # saved by reference, no new memory
    saved += [t for t in loss.grad_fn.grads if t is not None]  # the gradients the loss's node holds
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)
    assert extra >= N * H * 4 + V * H * 4
    full_logits = N * V * 4
    index = N * 8  # the int64 positions index_select keeps for its own backward
    assert extra <= N * H * 4 + V * H * 4 + index < full_logits / 5, (extra, full_logits)
    loss.backward()  # and backward still works from what was saved
    assert hidden.grad is not None and weight.grad is not None

    saved.clear()
    frozen = weight.detach()  # LoRA: the head is frozen, only d hidden is kept
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_lm_loss(hidden, frozen, labels, chunk_size=64)
    saved += [t for t in loss.grad_fn.grads if t is not None]
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)
    assert extra <= N * H * 4 + index and extra < full_logits / 50, (extra, full_logits)


def test_errors_name_what_is_wrong():
    hidden, weight, _, labels = _inputs(bias=False)
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_lm_loss(hidden, weight, labels, chunk_size=0)
    with pytest.raises(DataError, match="does not fit lm_head weight"):
        chunked_lm_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(DataError, match="align them first"):
        chunked_lm_loss(hidden[:, :-1], weight, labels)
    bad = labels.clone()
    bad[1, 1] = 50
    with pytest.raises(DataError, match=r"\[0, 50\), found 50"):
        chunked_lm_loss(hidden, weight, bad)


def test_backward_once_scales_in_place_and_refuses_a_second_backward():
    hidden, weight, b, labels = _inputs()
    loss, n = chunked_lm_loss(hidden, weight, labels, chunk_size=4, lm_head_bias=b, backward_once=True)
    held = loss.grad_fn.grads[1]  # dL/dW, computed in forward
    (loss / n).backward(retain_graph=True)
    assert torch.equal(held, weight.grad)  # scaled in place and handed over: no second [V, H] copy
    w2 = weight.detach().clone().requires_grad_()
    (_naive(hidden.detach(), w2, b.detach(), labels) / n).backward()
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
