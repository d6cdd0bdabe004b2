"""Each strategy on constructed data: what it keeps and why (embeddings given, no encoder)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deltatune.select import get_strategy
from deltatune.select.strategies.dedup import near_duplicate_filter
from deltatune.select.strategies.diversity import allocate, kmeans
from deltatune.select.strategies.got_d import calibrated_gradient
from deltatune.select.strategies.quality import fit_linear_rule
from tests.unit.select.helpers import clusters, context_with, recipe, write_jsonl


def _run(ctx):
    cfg = ctx.recipe.strategy_config()
    return get_strategy(cfg.name).select(ctx, cfg)


def test_got_d_picks_candidates_near_the_target_cluster(tmp_path):
    emb, ids = clusters([60, 60, 60], seed=1)  # cluster 1 is the target's
    target, _ = clusters([0, 20, 0], seed=1)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": f"candidate {i}"} for i in range(180)])
    tgt = write_jsonl(tmp_path / "target.jsonl", [{"text": f"target {i}"} for i in range(20)])
    r = recipe(tmp_path, {"name": "got_d", "reg": 0.05, "batch_size": 50}, pool, target={"path": str(tgt)}, budget=40)
    sel = _run(context_with(r, emb, target))
    assert len(sel.indices) == 40
    assert all(ids[i] == 1 for i in sel.indices)
    assert sel.summary["chunks"] == 4  # 180 candidates in mini-batches of <= 50
    grads = [sel.scores[i]["ot_gradient"] for i in sel.indices]
    assert grads == sorted(grads) and max(grads) < 0


def test_got_d_gradient_matches_the_finite_difference_of_the_ot_objective():
    """g_i = d OT_eps / d a_i up to a shared constant: compare with central differences of POT's dual objective."""
    import ot

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    reg = 0.3
    grad, _ = calibrated_gradient(x, y, reg, max_iter=3000, tol=1e-11)
    cost = (1 - x.double() @ y.double().T).numpy()
    b = np.full(5, 0.2)

    def objective(a):  # min <P, C> - reg * H(P), H(P) = -sum P (log P - 1); its gradient in a is the dual potential f
        plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=3000, stopThr=1e-11, warn=False)
        return float((plan * cost).sum() + reg * (plan * (np.log(plan) - 1)).sum())

    a0, h = np.full(6, 1 / 6), 1e-5
    fd = np.array([(objective(a0 + h * e) - objective(a0 - h * e)) / (2 * h) for e in np.eye(6)])
    fd_cal = fd - (fd.sum() - fd) / 5
    assert np.allclose(grad, fd_cal, atol=2e-3)


def test_diversity_covers_all_clusters_of_an_unbalanced_pool(tmp_path):
    emb, ids = clusters([150, 10, 10, 10], seed=2)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": f"t{i}"} for i in range(180)])
    r = recipe(tmp_path, {"name": "diversity", "clusters": 4}, pool, budget=20)
    sel = _run(context_with(r, emb))
    picked = [ids[i] for i in sel.indices]
    assert sorted(set(picked)) == [0, 1, 2, 3]
    assert [picked.count(c) for c in range(4)] == [5, 5, 5, 5]
    # Uniform random 20 of 180 would take ~17 from the big cluster.
    assert sel.scores[sel.indices[0]]["cluster_quota"] == 5.0


def test_kmeans_recovers_planted_clusters_and_allocate_respects_caps():
    emb, ids = clusters([30, 20, 10], seed=3)
    assign, _ = kmeans(emb, 3, 50, torch.Generator().manual_seed(0))
    groups = {frozenset(torch.nonzero(assign == c).flatten().tolist()) for c in range(3)}
    truth = {frozenset(i for i, c in enumerate(ids) if c == k) for k in range(3)}
    assert groups == truth
    assert allocate([1, 1, 1], [2, 50, 50], 30) == [2, 14, 14]
    assert allocate([3, 1], [100, 100], 8) == [6, 2]
    assert sum(allocate([0.2, 0.5, 0.3], [3, 4, 5], 12)) == 12


def test_dedup_removes_planted_exact_and_near_duplicates(tmp_path):
    emb, _ = clusters([1] * 8, dim=32, seed=4)  # 8 distinct directions
    texts = [f"sentence number {i}" for i in range(8)]
    rows = [{"text": t} for t in texts]
    rows.append({"text": "  Sentence   NUMBER 3 "})  # exact duplicate of 3 after normalising
    rows.append({"text": "sentence number five, slightly edited"})  # near duplicate of 5
    emb = torch.cat([emb, emb[3:4], torch.nn.functional.normalize(emb[5:6] + 0.01 * torch.randn(1, 32), dim=-1)])
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    sel = _run(context_with(recipe(tmp_path, {"name": "dedup", "threshold": 0.9}, pool), emb))
    assert sel.indices == list(range(8))
    removed = {r["origin"].rsplit(":", 1)[1]: r for r in sel.summary["removed"]}
    assert removed["9"]["kind"] == "exact" and removed["9"]["duplicate_of"].endswith(":4")
    assert removed["10"]["kind"] == "near" and removed["10"]["duplicate_of"].endswith(":6") and removed["10"]["cosine"] >= 0.9
    assert all(s["max_cosine_to_kept"] < 0.9 for s in sel.scores.values())


def test_near_duplicate_filter_equals_the_naive_greedy_loop():
    g = torch.Generator().manual_seed(5)
    base = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    emb = torch.nn.functional.normalize(torch.cat([base, base[::3] + 0.05 * torch.randn(14, 8, generator=g)]), dim=-1)
    order = torch.randperm(len(emb), generator=g).tolist()
    kept_ref = []
    for i in order:
        if not kept_ref or float((emb[kept_ref] @ emb[i]).max()) < 0.8:
            kept_ref.append(i)
    for block in (1, 7, 100):
        kept, dropped = near_duplicate_filter(emb, order, 0.8, block)
        assert kept == kept_ref
        assert set(dropped) == set(order) - set(kept_ref)


def test_exact_dedup_only_needs_no_model(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": "a b"}, {"text": "A  b"}, {"text": "c"}])
    r = recipe(tmp_path, {"name": "dedup", "threshold": None}, pool)
    ctx = context_with(r, torch.zeros(0))  # an embedding lookup would fail on this
    ctx._cache.clear()
    sel = _run(ctx)
    assert sel.indices == [0, 2]


def test_quality_top_k_by_linear_rule_with_reward(tmp_path):
    rows = [{"instruction": "say " * (1 + i % 3), "output": "word " * (i + 1), "stars": float(10 - i)} for i in range(10)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    r = recipe(tmp_path, {"name": "quality", "weights": {"length": 1.0}}, pool, budget=3)
    sel = _run(context_with(r, torch.zeros(0)))
    assert sorted(sel.indices) == [7, 8, 9]  # the longest responses
    assert sel.scores[9]["length"] == 10.0
    r = recipe(tmp_path, {"name": "quality", "weights": {"reward": 1.0, "length": 0.0},
                          "reward_fn": "tests.unit.select.test_strategies:stars"}, pool, budget=2)
    sel = _run(context_with(r, torch.zeros(0)))
    assert sel.indices == [0, 1]
    r = recipe(tmp_path, {"name": "quality", "weights": {"ratio": 1.0}}, pool, budget=1)
    assert _run(context_with(r, torch.zeros(0))).indices == [9]  # 10 response words / 1 prompt word


def stars(record: dict) -> float:
    return record["stars"]


def test_fit_linear_rule_recovers_planted_weights():
    g = torch.Generator().manual_seed(6)
    rows = [{"length": float(a), "perplexity": float(b)} for a, b in torch.randn(8, 2, generator=g).tolist()]
    losses = [1.5 + 0.3 * r["length"] - 0.7 * r["perplexity"] for r in rows]
    fit = fit_linear_rule(rows, losses)
    assert fit["length"] == pytest.approx(0.3, abs=1e-9) and fit["perplexity"] == pytest.approx(-0.7, abs=1e-9)
    assert fit["bias"] == pytest.approx(1.5, abs=1e-9)
