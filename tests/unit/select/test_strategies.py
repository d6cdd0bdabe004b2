"""Each strategy on constructed data: what it keeps and why (embeddings given, no encoder)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltatune.select import get_strategy
from deltatune.select.strategies.dedup import near_duplicate_filter
from deltatune.select.strategies.diversity import allocate, kmeans
from deltatune.select.strategies.got_d import calibrated_gradient
from deltatune.select.strategies.quality import fit_linear_rule
from deltatune.utils.errors import ConfigError, DataError
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


def test_diversity_target_mode_resamples_clusters_in_the_target_proportions(tmp_path):
    emb, ids = clusters([60, 60, 60, 12], seed=4)
    target_emb, target_ids = clusters([0, 15, 5, 0], seed=4)  # same centres: 3/4 of the target in cluster 1
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": f"t{i}"} for i in range(len(ids))])
    tgt = write_jsonl(tmp_path / "target.jsonl", [{"text": f"q{i}"} for i in range(len(target_ids))])
    r = recipe(tmp_path, {"name": "diversity", "clusters": 4, "mode": "target"}, pool, target={"path": str(tgt)}, budget=40)
    sel = _run(context_with(r, emb, target_emb))
    picked = [ids[i] for i in sel.indices]
    assert [picked.count(c) for c in range(4)] == [0, 30, 10, 0]
    assert sorted(sel.summary["cluster_target_members"]) == [0, 0, 5, 15]
    assert {sel.scores[i]["cluster_target_members"] for i in sel.indices} == {15.0, 5.0}
    # A budget beyond the target's clusters spills over to the others once those run out.
    r = recipe(tmp_path, {"name": "diversity", "clusters": 4, "mode": "target"}, pool, target={"path": str(tgt)}, budget=150)
    picked = [ids[i] for i in _run(context_with(r, emb, target_emb)).indices]
    assert picked.count(1) == 60 and picked.count(2) == 60 and len(picked) == 150


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


def _fit_pool(tmp_path):
    rows = [{"instruction": "do " * (1 + i % 4), "output": "w " * (1 + (7 * i) % 23)} for i in range(40)]
    return rows, write_jsonl(tmp_path / "pool.jsonl", rows)


def test_quality_fit_recovers_a_planted_rule_from_run_losses_and_selects_by_it(tmp_path):
    """Runs whose losses follow loss = 1 + 0.3 z(length) - 0.1 z(ratio) (pool-standardised means):
    the fitted weights are the negated coefficients and the selection is the top-k of that rule."""
    rows, pool = _fit_pool(tmp_path)
    length = torch.tensor([len(r["output"].split()) for r in rows], dtype=torch.float64)
    ratio = length / torch.tensor([len(r["instruction"].split()) for r in rows], dtype=torch.float64)
    z_len, z_ratio = (length - length.mean()) / length.std(unbiased=False), (ratio - ratio.mean()) / ratio.std(unbiased=False)
    runs, g = [], torch.Generator().manual_seed(3)
    for r in range(5):
        idx = torch.randperm(40, generator=g)[:8].tolist()
        data = write_jsonl(tmp_path / f"run{r}.jsonl", [rows[i] for i in idx])
        loss = 1.0 + 0.3 * float(z_len[idx].mean()) - 0.1 * float(z_ratio[idx].mean())
        runs.append({"data": str(data), "loss": loss})
    r = recipe(tmp_path, {"name": "quality", "fit": {"indicators": ["length", "ratio"], "runs": runs}}, pool, budget=6)
    sel = _run(context_with(r, torch.zeros(0)))
    assert sel.summary["weights"] == pytest.approx({"length": -0.3, "ratio": 0.1}, abs=1e-9)
    assert sel.summary["fit"]["r2"] == pytest.approx(1.0, abs=1e-9)
    # An exact fit: no residual, so the standard errors are zero; the design is well conditioned.
    assert sel.summary["fit"]["std_errors"]["length"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 <= sel.summary["fit"]["condition_number"] < 100
    assert r.strategy_config().model_dump()["weights"] is None  # the report shows no unused default rule
    assert [run["predicted"] for run in sel.summary["fit"]["runs"]] == pytest.approx([run["loss"] for run in runs], abs=1e-9)
    expected = sorted(range(40), key=lambda i: (-float(-0.3 * z_len[i] + 0.1 * z_ratio[i]), i))[:6]
    assert sel.indices == expected
    assert "fitted on 5 runs" in sel.reason


class _CountingScorer:
    """Mean NLL = words in the response / 10; remembers which records it was asked to score."""

    def __init__(self):
        self.scored: list[str] = []

    def mean_nll(self, pool, indices=None, desc=""):
        indices = range(len(pool)) if indices is None else indices
        self.scored += [pool.items[i].response for i in indices]
        return {i: len(pool.items[i].response.split()) / 10 for i in indices}


def test_quality_fit_scores_perplexity_once_per_record(tmp_path):
    rows, pool = _fit_pool(tmp_path)
    new = {"instruction": "new", "output": "never seen before in the pool"}
    runs = [{"data": str(write_jsonl(tmp_path / f"run{r}.jsonl", rows[r * 8:(r + 1) * 8] + ([new] if r == 0 else []))),
             "loss": 1.0 + r / 10} for r in range(3)]
    r = recipe(tmp_path, {"name": "quality", "fit": {"indicators": ["perplexity"], "runs": runs}}, pool, budget=4)
    ctx = context_with(r, torch.zeros(0))
    ctx._cache["scorer"] = scorer = _CountingScorer()
    sel = _run(ctx)
    assert len(scorer.scored) == 41 and scorer.scored[-1] == new["output"]  # the pool once, then only the new record
    assert set(sel.summary["weights"]) == {"perplexity"} and len(sel.indices) == 4
    # Run 0's row: the mean of its records' perplexities standardised with the *pool's* mean and std.
    ppl = torch.tensor([math.exp(len(row["output"].split()) / 10) for row in rows], dtype=torch.float64)
    run0 = torch.tensor([math.exp(len(row["output"].split()) / 10) for row in rows[:8] + [new]], dtype=torch.float64)
    expected = float(((run0 - ppl.mean()) / ppl.std(unbiased=False)).mean())
    assert sel.summary["fit"]["runs"][0]["indicators"]["perplexity"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fit, message", [
    ({"indicators": ["length", "ratio"], "runs": [{"data": "a.jsonl", "loss": 1.0}, {"data": "b.jsonl", "loss": 2.0}]},
     "2 runs cannot fit 2 indicators and a bias; expected at least 3 runs"),
    ({"indicators": ["lenght"], "runs": [{"data": "a.jsonl", "loss": 1.0}, {"data": "b.jsonl", "loss": 2.0}]}, "did you mean 'length'"),
    ({"indicators": ["length"], "runs": [{"data": "a.jsonl", "loss": float("nan")}, {"data": "b.jsonl", "loss": 2.0}]}, "not a finite number"),
])
def test_quality_fit_config_errors(tmp_path, fit, message):
    _, pool = _fit_pool(tmp_path)
    with pytest.raises(ConfigError, match=message):
        recipe(tmp_path, {"name": "quality", "fit": fit}, pool, budget=3)
    with pytest.raises(ConfigError, match="give weights or fit, not both"):
        recipe(tmp_path, {"name": "quality", "weights": {"length": 1.0},
                          "fit": {"indicators": ["length"], "runs": [{"data": "a", "loss": 1.0}, {"data": "b", "loss": 2.0}]}}, pool, budget=3)


def test_selection_refuses_to_write_over_a_fit_run_file(tmp_path):
    from deltatune.select import run_selection

    rows, pool = _fit_pool(tmp_path)
    runs = [{"data": str(write_jsonl(tmp_path / f"run{r}.jsonl", rows[r * 5:(r + 1) * 5])), "loss": 1.0 + r} for r in range(3)]
    r = recipe(tmp_path, {"name": "quality", "fit": {"indicators": ["length"], "runs": runs}}, pool, budget=3,
               output={"path": runs[1]["data"]})
    with pytest.raises(ConfigError, match=r"run1\.jsonl' is an input file"):
        run_selection(r)
    assert (tmp_path / "run1.jsonl").read_text().count("\n") == 5  # untouched


def test_quality_fit_refuses_runs_that_do_not_determine_the_weights(tmp_path):
    rows, pool = _fit_pool(tmp_path)
    same = str(write_jsonl(tmp_path / "same.jsonl", rows[:8]))
    runs = [{"data": same, "loss": 1.0 + r / 10} for r in range(3)]  # one indicator row three times: rank 1 of 3
    r = recipe(tmp_path, {"name": "quality", "fit": {"indicators": ["length", "ratio"], "runs": runs}}, pool, budget=3)
    with pytest.raises(ConfigError, match=r"same\.jsonl.*rank 1, below the 3 unknowns"):
        _run(context_with(r, torch.zeros(0)))


def test_quality_fit_run_file_errors_name_the_file_before_any_scoring(tmp_path):
    rows, pool = _fit_pool(tmp_path)
    good = str(write_jsonl(tmp_path / "good.jsonl", rows[:5]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"instruction": "no response here"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text"}])
    for path, message in ((bad, r"bad\.jsonl:2"), (text, r"text\.jsonl:1: the fit run's data is 'text'"),
                          (tmp_path / "missing.jsonl", "missing.jsonl")):
        runs = [{"data": good, "loss": 1.0}, {"data": str(path), "loss": 2.0}]
        r = recipe(tmp_path, {"name": "quality", "fit": {"indicators": ["perplexity"], "runs": runs}}, pool, budget=3)
        ctx = context_with(r, torch.zeros(0))
        ctx._cache["scorer"] = scorer = _CountingScorer()
        with pytest.raises((DataError, ConfigError), match=message):
            _run(ctx)
        assert scorer.scored == []
