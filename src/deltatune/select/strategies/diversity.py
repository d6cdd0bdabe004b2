"""Diversity: k-means over embeddings, then sample across clusters.

("Diversify and Conquer: diversity-centric data selection with iterative refinement", 2024.)
Spherical k-means (unit embeddings, k-means++ seeding) splits the pool into ``k`` clusters.
The budget is shared out by :func:`allocate`: equal shares (``mode: uniform``), or shares
``∝ softmax(L_c / temperature)`` where ``L_c`` is the scoring model's mean loss on a probe of
cluster ``c`` (``mode: loss``) — clusters the current model handles worst get more examples —
or ``∝`` the number of target-sample embeddings nearest to cluster ``c``'s centroid (``mode:
target``, needs ``target.path``): the pool is resampled, cluster by cluster, in the proportions
of the target task. The target mode is our addition, not the paper's (stratified resampling
towards a target, the idea behind importance-resampling selection such as DSIR); clusters
without target members get budget only once the others run out of members.
Inside a cluster, examples are drawn at random (seeded).

The iterative refinement of the paper is: select → train → score the clusters again with the
trained delta (``model.delta: run/adapter``, ``mode: loss``) → select the next batch; each
round is one ``deltatune select`` run (see docs/selection.md).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from deltatune.select.registry import Selection, StrategyConfig, register_strategy


class DiversityConfig(StrategyConfig):
    name: str = "diversity"
    clusters: int | None = Field(None, ge=1)  # default: round(sqrt(budget)), at least 2
    kmeans_iters: int = Field(50, ge=1)
    mode: Literal["uniform", "loss", "target"] = "uniform"
    temperature: float = Field(1.0, gt=0)
    probe: int = Field(16, ge=1)  # examples per cluster scored in loss mode


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` squared Euclidean distances from rows of ``x`` to rows of ``c``."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(assignment [n], centroids [k, d])``: Lloyd's algorithm with greedy k-means++ seeding.

    Plain meaning: minimise ``sum_i ||x_i - c_{a_i}||^2``; an emptied cluster is re-seeded at
    the point farthest from its centroid so every cluster keeps members.
    """
    n = len(x)
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    sq = (x * x).sum(1)
    trials = 2 + int(math.log(k))  # greedy k-means++ (as scikit-learn): best of a few D²-sampled candidates
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        cand = torch.multinomial(probs, trials, replacement=True, generator=generator)
        dist = (sq.unsqueeze(0) - 2 * x[cand] @ x.T + sq[cand].unsqueeze(1)).clamp_min(0)  # [trials, n]
        new_d2 = torch.minimum(d2.unsqueeze(0), dist)
        best = int(new_d2.sum(1).argmin())
        centroids.append(x[cand[best]])
        d2 = new_d2[best]
    c = torch.stack(centroids)
    assign = torch.zeros(n, dtype=torch.long)
    for it in range(iters):
        dist = squared_distances(x, c)
        new = dist.argmin(1)
        if it > 0 and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dist.min(1).values.argmax())
            sums[j], counts[j] = x[far], 1
            assign[far] = j
        c = sums / counts.unsqueeze(1)
    return assign, c


def allocate(weights: list[float], sizes: list[int], budget: int) -> list[int]:
    """Integer quotas ``q_c <= sizes[c]`` with ``sum q = budget``, as close to ``∝ weights`` as the caps allow.

    Water-filling: share what is left among the clusters that still have room, floor, hand
    out the remainder by largest fractional part, cap at the cluster size, repeat.
    """
    if budget > sum(sizes):
        raise ValueError(f"budget {budget} exceeds the {sum(sizes)} items available")
    quota = [0] * len(sizes)
    left = budget
    while left > 0:
        open_ = [c for c in range(len(sizes)) if quota[c] < sizes[c]]
        w = {c: max(weights[c], 0.0) for c in open_}
        if sum(w.values()) == 0:
            w = dict.fromkeys(open_, 1.0)
        total = sum(w.values())
        share = {c: left * w[c] / total for c in open_}
        give = {c: math.floor(share[c]) for c in open_}
        rest = left - sum(give.values())
        for c in sorted(open_, key=lambda c: (-(share[c] - give[c]), c))[:rest]:
            give[c] += 1
        for c in open_:
            add = min(give[c], sizes[c] - quota[c])
            quota[c] += add
            left -= add
    return quota


@register_strategy(DiversityConfig, needs_target=("mode", "target"))
def select_diversity(ctx, config: DiversityConfig) -> Selection:
    """k-means over embeddings; the budget shared across clusters (equally, or by model loss)."""
    x = ctx.pool_embeddings()
    k = config.clusters or max(2, round(math.sqrt(ctx.budget)))
    k = min(k, len(x))
    assign, centroids = kmeans(x, k, config.kmeans_iters, ctx.generator("kmeans"))
    members = [torch.nonzero(assign == c).flatten() for c in range(k)]
    members = [m[torch.randperm(len(m), generator=ctx.generator(f"cluster-{c}"))].tolist() for c, m in enumerate(members)]
    sizes = [len(m) for m in members]
    losses = target_counts = None
    if config.mode == "target":
        y = ctx.target_embeddings()
        nearest = squared_distances(y, centroids).argmin(1)
        target_counts = torch.bincount(nearest, minlength=k).tolist()
        weights = [float(n) for n in target_counts]
    elif config.mode == "loss":
        probe = [i for m in members for i in m[: config.probe]]
        nll = ctx.scorer().mean_nll(ctx.pool, probe, desc="diversity: cluster losses")
        losses = [sum(nll[i] for i in m[: config.probe]) / max(1, len(m[: config.probe])) if m else 0.0 for m in members]
        z = torch.tensor(losses) / config.temperature
        weights = torch.softmax(z - z.max(), 0).tolist()
    else:
        weights = [1.0] * k
    quota = allocate(weights, sizes, ctx.budget)
    kept, scores = [], {}
    # Round-robin over clusters so the selection order (and any prefix of it) stays diverse.
    for r in range(max(quota) if quota else 0):
        for c in range(k):
            if r < quota[c]:
                i = members[c][r]
                kept.append(i)
                scores[i] = {"cluster": float(c), "cluster_size": float(sizes[c]), "cluster_quota": float(quota[c])}
                if losses is not None:
                    scores[i]["cluster_loss"] = losses[c]
                if target_counts is not None:
                    scores[i]["cluster_target_members"] = float(target_counts[c])
    how = {"uniform": "with equal quotas", "loss": "with quotas weighted by the model's loss per cluster",
           "target": "with quotas proportional to the target sample's members per cluster"}[config.mode]
    return Selection(kept, scores, reason=f"sampled across k-means clusters {how}",
                     summary={"clusters": k, "sizes": sizes, "quotas": quota, "cluster_losses": losses, "cluster_target_members": target_counts})
