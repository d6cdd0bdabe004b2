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
    backward_once: bool = False,
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

    ``backward_once=True`` (what the trainer's objective passes: it backpropagates each loss
    once): backward scales the gradients computed in forward *in place* and hands them over, so a
    trained head costs one ``[V, H]`` fp32 buffer instead of two at the start of backward; a second
    backward through the same loss (``retain_graph=True``) then fails with a clear error.
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
    loss_sum = _ChunkedCrossEntropy.apply(rows, lm_head_weight, lm_head_bias, targets, chunk_size, compute_dtype, backward_once)
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
    """Sum of cross-entropies over rows, with the gradients computed *during* forward.

    The loss is a scalar, so d(loss)/d(inputs) is known as soon as each chunk's softmax is:
    ``g = softmax(z) - onehot(y)``; ``d rows = g @ W``, ``d W = gᵀ @ rows``, ``d b = Σ g``.
    Forward keeps those (rows-sized, and W-sized only when W is trained) instead of the inputs,
    and backward just scales them by the incoming gradient — one vocabulary projection per chunk
    in total, where saving inputs and recomputing in backward would need two.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, compute_dtype, backward_once):  # noqa: D102
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Weight / bias grads are summed over chunks in >= fp32 even when matmuls run in bf16.
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        # Autocast off inside: dtypes are chosen explicitly.
        with torch.autocast(rows.device.type, enabled=False):
            w, b = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
            for start in range(0, rows.shape[0], chunk_size):
                stop = start + chunk_size
                chunk_rows = rows[start:stop].to(compute_dtype)
                chunk_targets = targets[start:stop]
                logits = _chunk_logits(chunk_rows, w, b)
                target_logit = logits.gather(1, chunk_targets[:, None]).squeeze(1)
                # In-place logsumexp: max-shift, exp, sum — no second [n, V] temporary.
                row_max = logits.amax(dim=1)
                logits.sub_(row_max[:, None]).exp_()
                sums = logits.sum(dim=1)
                total += (sums.log() + row_max - target_logit).sum()
                if not (need_rows or need_w or need_b):
                    continue
                g = logits.div_(sums[:, None])  # softmax, in place
                g[torch.arange(g.shape[0], device=g.device), chunk_targets] -= 1
                if grad_b is not None:
                    grad_b += g.sum(dim=0)
                if grad_w is not None:
                    grad_w.addmm_(g.T.to(acc_dtype), chunk_rows.to(acc_dtype))
                if grad_rows is not None:
                    grad_rows[start:stop] = (g.to(compute_dtype) @ w).to(rows.dtype)
        # Intermediates, not inputs or outputs: kept on ctx (save_for_backward is for those).
        ctx.grads, ctx.backward_once = (grad_rows, grad_w, grad_b), backward_once
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):  # noqa: D102
        if ctx.grads is None:
            raise RuntimeError("chunked_lm_loss(backward_once=True): backward ran twice through the same loss "
                               "(retain_graph=True); compute the loss again, or pass backward_once=False")
        grad_rows, grad_w, grad_b = ctx.grads
        w_dtype, b_dtype = ctx.dtypes

        def scaled(grad: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
            if grad is None:
                return None
            factor = grad_total.to(grad.dtype)
            return (grad.mul_(factor) if ctx.backward_once else grad * factor).to(dtype or grad.dtype)

        if ctx.backward_once:
            ctx.grads = None  # handed over: autograd owns them now
        return (
            scaled(grad_rows),
            scaled(grad_w, w_dtype),
            scaled(grad_b, b_dtype),
            None,
            None,
            None,
            None,
        )

