"""Data selection for instruction tuning (issue 8, part b): SmolLM2 trained on 20% of a pool of
instruction sets, chosen by each strategy vs chosen at random — held-out loss.

Pool: the Alpaca-format instruction sets in ``../shared/data`` (alpaca_en_demo, code_alpaca_2k,
rasbt_instruction_1100), shuffled with a fixed seed; from each set ``--heldout`` of the records are
held out for the evaluation and ``--target`` more form GOT-D's target sample (a small sample of the
same mixture, never trained on). Every run trains the same LoRA on SmolLM2-135M-Instruct for the
same steps (chat template, loss on the response, packing) and reports the mean token loss on the
held-out records. Random baselines use several seeds; their spread is the bar.

``--target-set NAME`` (a directory name of SETS) turns it into a target-task experiment: the
held-out records and GOT-D's target sample come from that set alone, the pool is still the
whole mixture (the rest of that set included), so a strategy that finds the target's kind of
data can beat the mixture that random sampling returns.

``--fit-quality`` adds ``quality(fitted)``, Instruction Mining's fitted rule: short probe runs
(``--fit-size`` records, default the budget, chosen by ``quality`` with one indicator high or
low, or two indicators in contrast; ``--fit-steps`` steps each) are evaluated on the *target sample* (never on the held-out records), and
``quality``'s ``fit`` turns their losses into the rule's weights.

    .venv/bin/python bench/selection_instruct.py --steps 40 --random-seeds 0 1 2
    .venv/bin/python bench/selection_instruct.py --target-set rasbt_instruction_1100 --heldout 0.1 --only got_d
    .venv/bin/python bench/selection_instruct.py --target-set rasbt_instruction_1100 --heldout 0.1 --only "diversity(target)" \
        --fit-quality --random-seeds --reuse-random bench/results/selection_instruct_session7_rasbt.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from selection import compare, report, select, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
SETS = ["alpaca_en_demo/alpaca_en_demo.json", "code_alpaca_2k/code_alpaca_2k.json", "rasbt_instruction_1100/instruction-data.json"]
MODEL = "smollm2-135m-instruct"
STRATEGIES = {
    "got_d": {"name": "got_d"},
    "diversity": {"name": "diversity", "clusters": 32},
    "diversity(loss)": {"name": "diversity", "clusters": 32, "mode": "loss"},
    "diversity(target)": {"name": "diversity", "clusters": 32, "mode": "target"},
    "quality(perplexity,length)": {"name": "quality", "weights": {"perplexity": -1.0, "length": 0.5}},
}


def split_sets(heldout: float, target: int, seed: int = 0, target_set: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(pool, held-out, target) records: each set split with the same fractions, or (``target_set``)
    held-out and target taken from that set only."""
    pool, held, tgt = [], [], []
    rng = random.Random(seed)
    for name in SETS:
        rows = [{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in json.loads((DATA / name).read_text(encoding="utf-8"))]
        rows = [r for r in rows if r["instruction"].strip() and r["output"].strip()]  # a few records have no response
        if target_set is not None and not name.startswith(target_set + "/"):
            pool += rows
            continue
        rng.shuffle(rows)
        n_held = round(heldout * len(rows))
        n_tgt = target if target_set is not None else target // len(SETS)
        held += rows[:n_held]
        tgt += rows[n_held:n_held + n_tgt]
        pool += rows[n_held + n_tgt:]
    rng.shuffle(pool)
    return pool, held, tgt


def train_eval(work: Path, name: str, train_path: Path, eval_path: Path, steps: int, seed: int) -> dict:
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train

    recipe = load_recipe(None, default={
        "model": {"name": MODEL},
        "delta": {"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "data": {"path": str(train_path), "eval_path": str(eval_path), "template": "chat", "max_length": 384, "packing": True},
        "optim": {"lr": 2e-4},
        "schedule": {"name": "cosine", "warmup_ratio": 0.05},
        "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 2, "seed": seed, "log_every": 20, "progress": False},
        "eval": {"metric": "loss", "batch_size": 8},
        "output": {"dir": str(work / "runs"), "name": name},
    })
    t = time.perf_counter()
    result = train(recipe)
    return {"loss": result["after"]["loss"], "train_seconds": time.perf_counter() - t}


def probe_rules(indicators: list[str]) -> dict[str, dict[str, float]]:
    """Selection rules of the probe runs: each indicator alone, high and low, and for each pair
    of indicators the two contrasts (one high while the other is low), so the probes' indicator
    means vary independently and the fit can tell the indicators apart."""
    rules = {}
    for key in indicators:
        rules[f"probe_{key}_high"] = {key: 1.0}
        rules[f"probe_{key}_low"] = {key: -1.0}
    for i, a in enumerate(indicators):
        for b in indicators[i + 1:]:
            rules[f"probe_{a}_high_{b}_low"] = {a: 1.0, b: -1.0}
            rules[f"probe_{a}_low_{b}_high"] = {a: -1.0, b: 1.0}
    return rules


def fit_probes(args, pool_path: Path, target_path: Path, scoring: dict) -> list[dict]:
    """One short run per probe rule: ``--fit-size`` records, ``--fit-steps`` steps, loss on the
    target sample (never on the held-out records). Returns quality's ``fit.runs``."""
    runs = []
    for name, weights in probe_rules(args.fit_indicators).items():
        path, _ = select(args.work, name, {"name": "quality", "weights": weights}, args.fit_size,
                         args.work / "embeddings", target_path, pool=pool_path, scoring=scoring)
        loss = train_eval(args.work, name, path, target_path, args.fit_steps, 0)["loss"]
        runs.append({"data": str(path), "loss": loss})
        print({"probe": name, "loss": loss}, flush=True)
    return runs


def reused_random(path: Path, args, sizes: dict[str, int]) -> list[dict]:
    """Random rows of an earlier result file run with the same split, budget and steps."""
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in ("budget", "steps", "heldout", "target", "target_set"):
        if old["config"].get(key, "None") != str(getattr(args, key)):
            raise SystemExit(f"{path}: its {key} is {old['config'].get(key)}, this run's is {getattr(args, key)}; cannot reuse its random runs")
    for key, value in sizes.items():  # the split itself, in case the data changed
        if old.get(key) != value:
            raise SystemExit(f"{path}: its {key} is {old.get(key)}, this run's is {value}; cannot reuse its random runs")
    rows = [{**r, "reused_from": str(path)} for r in old["runs"] if r["strategy"] == "random"]
    if not rows:
        raise SystemExit(f"{path} has no random runs to reuse")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--heldout", type=float, default=0.05, help="fraction of each set held out for the evaluation")
    p.add_argument("--target", type=int, default=90, help="records (spread over the sets) in GOT-D's target sample")
    p.add_argument("--target-set", choices=[n.split("/")[0] for n in SETS], help="held-out and target sample from this set only")
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--reuse-random", type=Path, help="take the random runs from this earlier result file (same settings) instead of training them")
    p.add_argument("--fit-quality", action="store_true", help="add quality(fitted): probe runs scored on the target sample")
    p.add_argument("--fit-indicators", nargs="+", default=["length", "ratio"])
    # Probes as large as the budget: small probes of very short records get repeated several times
    # in the same steps, and the fit then measures repetition instead of the kind of data (docs/benchmarks.md).
    p.add_argument("--fit-size", type=int, default=None, help="records per probe run (default: the budget)")
    p.add_argument("--fit-steps", type=int, default=10)
    p.add_argument("--only", nargs="*", default=list(STRATEGIES))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_selection_instruct")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_instruct.json")
    args = p.parse_args()
    if not args.random_seeds and not args.reuse_random:
        p.error("no random baseline: give --random-seeds or --reuse-random")
    if "quality(fitted)" in args.only:
        p.error("quality(fitted) is added by --fit-quality; leave it out of --only")
    unknown = [name for name in args.only if name not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; expected some of {list(STRATEGIES)}")

    pool, held, tgt = split_sets(args.heldout, args.target, target_set=args.target_set)
    pool_path = write_jsonl(args.work / "pool.jsonl", pool)
    eval_path = write_jsonl(args.work / "heldout.jsonl", held)
    target_path = write_jsonl(args.work / "target.jsonl", tgt)
    n = max(1, round(args.budget * len(pool)))
    print(f"pool {len(pool)}, held-out {len(held)}, target {len(tgt)}, subset {n}", flush=True)
    scoring = {"name": MODEL, "batch_size": 8, "max_length": 384}
    strategies = dict(STRATEGIES)
    only = list(args.only)
    if args.fit_quality:
        args.fit_size = args.fit_size or n
    sizes = {"pool": len(pool), "subset": n, "heldout": len(held), "target": len(tgt)}
    meta = {"config": {k: str(v) for k, v in vars(args).items()}, **sizes}
    prior = reused_random(args.reuse_random, args, sizes) if args.reuse_random else []  # checked before hours of runs
    if args.fit_quality:
        runs = fit_probes(args, pool_path, target_path, scoring)
        strategies["quality(fitted)"] = {"name": "quality", "fit": {"indicators": args.fit_indicators, "runs": runs}}
        only.append("quality(fitted)")
        meta["fit_probes"] = runs
    rows = prior + compare(args.work, pool, n, args.random_seeds, only,
                           train_one=lambda name, path: train_eval(args.work, name, path, eval_path, args.steps, 0),
                           select_one=lambda name, safe: select(args.work, safe, strategies[name], args.budget, args.work / "embeddings",
                                                                target_path, pool=pool_path, scoring=scoring))
    report(rows, "loss", higher_is_better=False, out=args.out, meta=meta)

if __name__ == "__main__":
    main()
