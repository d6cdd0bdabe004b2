"""GOT-D: choose the candidates that move the pool's distribution toward a target sample.

("Get more for less: principled data selection for warming up fine-tuning", Kang et al. 2024.)

With candidate embeddings ``X`` [n, d] (mass ``a = 1/n`` each), target embeddings ``Y`` [m, d]
(mass ``b = 1/m``) and the cosine cost ``C_ij = 1 - x_i·y_j``, the entropic OT problem

    OT_eps(a, b) = min_{P 1 = a, P^T 1 = b} <P, C> + eps * KL(P | a b^T)

is solved by Sinkhorn (POT). Its dual potential ``f`` (``f_i = eps * log u_i`` for the scaling
``P = diag(u) K diag(v)``, ``K = exp(-C / eps)``) is the gradient of ``OT_eps`` with respect to
the candidate masses, up to a constant shared by all ``i``; GOT-D calibrates it to

    g_i = f_i - sum_{j != i} f_j / (n - 1)

and keeps the ``budget`` candidates with the most negative ``g_i``: adding mass there lowers the
distance to the target the fastest.

Scale (documented approximation): one ``n × m`` problem does not fit for 100k candidates, so
the pool is split by a seeded permutation into ``ceil(n / batch_size)`` near-equal random
chunks, each solved against the whole target (at most ``max_target`` points, subsampled); each
chunk is a random sample of the same pool, so calibrated gradients of different chunks are on
the same scale and are ranked together — the mini-batch scheme of the GOT-D paper.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from deltatune.select.registry import Selection, StrategyConfig, register_strategy


class GotDConfig(StrategyConfig):
    name: str = "got_d"
    reg: float = Field(0.1, gt=0)           # eps, in cosine-distance units (costs lie in [0, 2])
    batch_size: int = Field(5000, ge=2)     # candidates per Sinkhorn problem
    max_target: int = Field(2000, ge=1)     # target points used (seeded subsample beyond this)
    max_iter: int = Field(1000, gt=0)
    tol: float = Field(1e-7, gt=0)


def calibrated_gradient(x: torch.Tensor, y: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """``(g, ot_cost)`` for candidates ``x`` [n, d] against target ``y`` [m, d] (unit rows).

    ``g`` [n]: calibrated gradient of ``OT_eps`` w.r.t. each candidate's mass; ``ot_cost``:
    ``<P, C>`` of the entropic plan.
    """
    import ot

    cost = (1.0 - x.double() @ y.double().T).clamp_min(0.0).numpy()
    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    # The plain (scaling) iteration is a matrix-vector product per step; below eps = 0.02 the
    # kernel exp(-C/eps) underflows for far pairs, so switch to the log-domain solver.
    method = "sinkhorn" if reg >= 0.02 else "sinkhorn_log"
    plan, log = ot.sinkhorn(a, b, cost, reg, method=method, numItermax=max_iter, stopThr=tol, log=True, warn=False)
    f = reg * (log["log_u"] if "log_u" in log else np.log(np.maximum(log["u"], 1e-300)))
    g = f - (f.sum() - f) / max(n - 1, 1)
    return g, float((plan * cost).sum())


@register_strategy(GotDConfig, needs_target=True)
def select_got_d(ctx, config: GotDConfig) -> Selection:
    """Entropic-OT gradient toward the target sample; most negative first."""
    x = ctx.pool_embeddings()
    y = ctx.target_embeddings()
    if len(y) > config.max_target:
        y = y[torch.randperm(len(y), generator=ctx.generator("got_d-target"))[: config.max_target]]
    n = len(x)
    chunks = max(1, math.ceil(n / config.batch_size))
    perm = torch.randperm(n, generator=ctx.generator("got_d-chunks"))
    grad = np.empty(n)
    costs = []
    for part in torch.tensor_split(perm, chunks):
        g, cost = calibrated_gradient(x[part], y, config.reg, config.max_iter, config.tol)
        grad[part.numpy()] = g
        costs.append(cost)
    nearest = (x @ y.T).max(dim=1).values
    order = np.argsort(grad, kind="stable")[: ctx.budget]
    scores = {int(i): {"ot_gradient": float(grad[i]), "nearest_target_cosine": float(nearest[i])} for i in order}
    return Selection(
        [int(i) for i in order], scores,
        reason="most negative calibrated gradient of the entropic OT distance to the target w.r.t. the candidate's mass",
        summary={"chunks": chunks, "target_points": len(y), "reg": config.reg, "ot_cost_mean": float(np.mean(costs))},
    )
