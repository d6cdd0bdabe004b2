"""Chunked causal-LM cross-entropy that never materialises the full ``[B, T, V]`` logits.

For a 49k vocabulary the fp32 logits of a batch of 8 x 256 tokens take 8*256*49152*4 B = 400 MB,
and plain autograd keeps them (plus their softmax) alive until backward. Here only the rows
whose label is not -100 are projected, ``chunk_size`` rows at a time, and backward recomputes
each chunk's logits instead of saving them, so the extra memory is about ``chunk_size * V * 4``
bytes whatever the batch size (plus a ``[V, H]`` >= fp32 dL/dW buffer when the LM head trains;
a frozen head, as under LoRA, gets none). Between forward and backward only the selected
hidden rows and one logsumexp per row are kept.

Math, per kept row ``i`` with hidden ``h_i`` (H), target ``y_i`` and ``z_i = W h_i + b`` (V)::

    loss_i = logsumexp(z_i) - z_i[y_i]
    dloss_i / dz_i = softmax(z_i) - onehot(y_i)          =: g_i   (V)
    dL/dh_i = g_i @ W      dL/dW = sum_i g_i^T h_i      dL/db = sum_i g_i
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatune.utils.errors import ConfigError, DataError

IGNORE_INDEX = -100


def chunked_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed token cross-entropy of ``hidden @ W.T (+ b)`` against already-aligned ``labels``.

    Shapes: ``hidden`` [B, T, H] (any leading dims), ``lm_head_weight`` W [V, H],
    ``labels`` [B, T] int (-100 = ignore), ``lm_head_bias`` [V] or None.
    Returns ``(loss_sum, n_tokens)``: a scalar, fp32 (float64 for float64 inputs), differentiable
    w.r.t. hidden, W and b; and an int64 scalar, the count of labels != -100.

    The caller aligns next-token prediction: ``chunked_lm_loss(h[:, :-1], W, labels[:, 1:])``.
    Plain-PyTorch equivalent (same value and gradients, ~N*V*4 bytes more memory)::

        loss_sum = F.cross_entropy((hidden @ W.T).flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=-100, reduction="sum")
        n_tokens = (labels != -100).sum()

    Logits are computed in the autocast dtype when autocast is on (else the promoted dtype of
    hidden and W), then upcast to at least fp32 for the log-softmax. All-ignored labels give
    ``(0., 0)`` and zero gradients, never NaN.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise DataError(
            f"chunked_lm_loss: hidden {tuple(hidden.shape)} does not fit lm_head weight "
            f"{tuple(lm_head_weight.shape)}; expected hidden [..., H] and weight [V, H]"
        )
    if labels.shape != hidden.shape[:-1]:
        raise DataError(
            f"chunked_lm_loss: labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} "
            "without its last dim; align them first (hidden[:, :-1], labels[:, 1:])"
        )
    if lm_head_bias is not None and lm_head_bias.shape != lm_head_weight.shape[:1]:
        raise DataError(
            f"chunked_lm_loss: lm_head bias {tuple(lm_head_bias.shape)} does not match "
            f"vocab size {lm_head_weight.shape[0]}"
        )

    # Select the scored rows first so prompt and padding positions cost no vocab projection.
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, keep).long()
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())  # one sync; a clear error beats a device assert
        if lo < 0 or hi >= lm_head_weight.shape[0]:
            raise DataError(
                f"chunked_lm_loss: label ids must be -100 or in [0, {lm_head_weight.shape[0]}), "
                f"found {lo if lo < 0 else hi}"
            )
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)

    compute_dtype = _compute_dtype(rows, lm_head_weight)
    loss_sum = _ChunkedCrossEntropy.apply(rows, lm_head_weight, lm_head_bias, targets, chunk_size, compute_dtype)
    return loss_sum, torch.tensor(targets.numel(), dtype=torch.long, device=labels.device)


def mean_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """``loss_sum / max(n_tokens, 1)`` of :func:`chunked_lm_loss` (0 when every label is -100).

    Equals ``F.cross_entropy(..., ignore_index=-100)`` (reduction="mean") whenever one label is kept.
    """
    loss_sum, n_tokens = chunked_lm_loss(hidden, lm_head_weight, labels, chunk_size, lm_head_bias)
    return loss_sum / n_tokens.clamp(min=1).to(loss_sum.dtype)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the naive ``hidden @ W.T`` would run in: the autocast dtype if autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ weight.T + bias`` [n, V], upcast to at least fp32 (float64 stays float64)."""
    logits = rows @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies over rows; saves only inputs and per-row logsumexp for backward."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, compute_dtype):  # noqa: D102
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=rows.device)
        lse = torch.empty(rows.shape[0], dtype=acc_dtype, device=rows.device)
        # Autocast off inside: dtypes are chosen explicitly so backward can reproduce them.
        with torch.autocast(rows.device.type, enabled=False):
            w, b = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
            for start in range(0, rows.shape[0], chunk_size):
                stop = start + chunk_size
                logits = _chunk_logits(rows[start:stop].to(compute_dtype), w, b)
                target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
                # In-place logsumexp: max-shift, exp, sum — no second [n, V] temporary.
                row_max = logits.amax(dim=1)
                logits.sub_(row_max[:, None]).exp_()
                chunk_lse = logits.sum(dim=1).log_().add_(row_max)
                lse[start:stop] = chunk_lse
                total += (chunk_lse - target_logit).sum()
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):  # noqa: D102
        rows, weight, bias, targets, lse = ctx.saved_tensors
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
        acc_dtype = lse.dtype
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Weight / bias grads are summed over chunks in >= fp32 even when matmuls run in bf16.
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        with torch.autocast(rows.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, rows.shape[0], chunk_size):
                stop = start + chunk_size
                chunk_rows = rows[start:stop].to(dtype)
                # g = (softmax(z) - onehot(y)) * dL, recomputed instead of saved.
                g = _chunk_logits(chunk_rows, w, b)
                g.sub_(lse[start:stop, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), targets[start:stop]] -= 1
                g.mul_(grad_total.to(g.dtype))
                if grad_b is not None:
                    grad_b += g.sum(dim=0)
                g = g.to(dtype)
                if grad_rows is not None:
                    grad_rows[start:stop] = (g @ w).to(rows.dtype)
                if grad_w is not None and g.dtype == acc_dtype:
                    grad_w.addmm_(g.T, chunk_rows)  # in place: no second [V, H] temporary
                elif grad_w is not None:
                    grad_w += g.T @ chunk_rows
        return (
            grad_rows,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )
