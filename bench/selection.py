"""Data selection on SST-2 with MiniLM-L6: train on 5% chosen by each strategy vs 5% random.

Part (a) of issue 8. Pool: SST-2 train (60,614 sentences). Every run trains the same LoRA on
MiniLM-L6 for the same number of steps and batch size on its 5% subset and is evaluated on the
same SST-2 validation sentences. GOT-D's target sample is the first ``--target`` validation
sentences (text only; those sentences are left out of the evaluation set). Selections come
from ``deltatune.select.run_selection`` with one shared embedding cache, so the pool is
embedded once. Random baselines use several seeds; their spread (max - min) is the bar a
strategy must clear.

    .venv/bin/python bench/selection.py                      # got_d, diversity, quality, dedup + 3 random seeds
    .venv/bin/python bench/selection.py --steps 100 --random-seeds 0 1 2 3 4

Writes bench/results/selection.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / ".." / "shared" / "data" / "sst2"

STRATEGIES = {
    "got_d": {"name": "got_d"},
    "diversity": {"name": "diversity", "clusters": 64},
    "quality(length)": {"name": "quality", "weights": {"length": 1.0}},
    # SST-2's rows are overlapping phrases of a few thousand sentences: drop near-duplicates first
    "dedup(0.9)": {"name": "dedup", "threshold": 0.9},
    "dedup(0.8)": {"name": "dedup", "threshold": 0.8},
    "diversity(300)": {"name": "diversity", "clusters": 300},
}


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (temp file, then rename): an interrupted run leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def select(work: Path, name: str, strategy: dict, budget: float, cache: Path, target: Path,
           pool: Path = SST2 / "train.tsv", scoring: dict | None = None, embedder: str = "minilm-l6",
           threads: int = 1) -> tuple[Path, float]:
    """Run one strategy through ``deltatune.select`` (``scoring``: the recipe's ``model`` section, for
    strategies that score with a language model)."""
    from deltatune.select import get_strategy, run_selection, validate_select_recipe

    data = {"strategy": strategy, "pool": {"path": str(pool)}, "budget": budget, "progress": False,
            "embedding": {"model": embedder, "batch_size": 128, "cache_dir": str(cache), "threads": threads},
            "output": {"path": str(work / f"{name}.jsonl")}}
    if scoring:
        data["model"] = scoring
    spec = get_strategy(strategy["name"])
    if spec.uses_target(spec.config_cls(**strategy)):
        data["target"] = {"path": str(target)}
    result = run_selection(validate_select_recipe(data))
    return result.output, result.seconds


def train_eval(work: Path, name: str, train_path: Path, eval_path: Path, steps: int, seed: int) -> dict:
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train

    recipe = load_recipe(None, default={
        "model": {"name": "minilm-l6", "task": "sequence-classification"},
        "delta": {"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "data": {"path": str(train_path), "eval_path": str(eval_path), "max_length": 64},
        "optim": {"lr": 1e-3, "weight_decay": 0.01},
        "schedule": {"name": "linear", "warmup_ratio": 0.06},
        "train": {"max_steps": steps, "batch_size": 32, "seed": seed, "log_every": 50, "progress": False, "threads": 1},
        "eval": {"metric": "accuracy", "batch_size": 128},
        "output": {"dir": str(work / "runs"), "name": name},
    })
    t = time.perf_counter()
    result = train(recipe)
    return {"accuracy": result["after"]["accuracy"], "train_seconds": time.perf_counter() - t}


def safe_name(strategy: str) -> str:
    """A file-name-safe form of a strategy label such as ``quality(length)``."""
    return strategy.replace("(", "_").replace(")", "").replace(",", "_")


def compare(work: Path, pool: list[dict], n: int, seeds: list[int], strategies: list[str], train_one, select_one) -> list[dict]:
    """Train on ``n`` random pool rows per seed, then on each strategy's choice; one row of results per run.
    ``train_one(name, path)`` → metrics; ``select_one(strategy, safe_name)`` → (selection path, seconds)."""
    rows = []
    for seed in seeds:
        subset = [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]
        path = write_jsonl(work / f"random{seed}.jsonl", subset)
        rows.append({"strategy": "random", "seed": seed, "select_seconds": 0.0, **train_one(f"random{seed}", path)})
        print(rows[-1], flush=True)
    for name in strategies:
        path, seconds = select_one(name, safe_name(name))
        rows.append({"strategy": name, "seed": 0, "select_seconds": seconds, **train_one(safe_name(name), path)})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], metric: str, higher_is_better: bool, out: Path, meta: dict) -> None:
    """Write the JSON (runs + the random seeds' mean/min/max/spread) and print the markdown table."""
    rand = [r[metric] for r in rows if r["strategy"] == "random"]
    summary = {"random_mean": statistics.mean(rand), "random_min": min(rand), "random_max": max(rand), "random_spread": max(rand) - min(rand)}
    write_text(out, json.dumps({**meta, "runs": rows, "summary": summary}, indent=2) + "\n")
    best = summary["random_max"] if higher_is_better else summary["random_min"]
    print(f"\n| strategy | {metric} | vs random mean | beyond the best random seed? | select s |\n|---|---|---|---|---|")
    for r in rows:
        beyond = r[metric] > best if higher_is_better else r[metric] < best
        mark = "" if r["strategy"] == "random" else ("yes" if beyond else "no")
        label = f"random (seed {r['seed']})" if r["strategy"] == "random" else r["strategy"]
        print(f"| {label} | {r[metric]:.4f} | {r[metric] - summary['random_mean']:+.4f} | {mark} | {r['select_seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--target", type=int, default=200, help="validation sentences used as GOT-D's target sample")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N validation sentences after the target sample")
    p.add_argument("--only", nargs="*", default=list(STRATEGIES))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_selection")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_selection" / "embeddings")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection.json")
    args = p.parse_args()

    pool = read_tsv(SST2 / "train.tsv")
    dev = read_tsv(SST2 / "validation.tsv")
    target = write_jsonl(args.work / "target.jsonl", [{"sentence": r["sentence"], "label": r["label"]} for r in dev[: args.target]])
    eval_rows = dev[args.target:][: args.max_eval] if args.max_eval else dev[args.target:]
    eval_path = write_jsonl(args.work / "eval.jsonl", eval_rows)
    n = max(1, round(args.budget * len(pool)))
    rows = compare(args.work, pool, n, args.random_seeds, args.only,
                   train_one=lambda name, path: train_eval(args.work, name, path, eval_path, args.steps, 0),
                   select_one=lambda name, safe: select(args.work, safe, STRATEGIES[name], args.budget, args.cache, target))
    report(rows, "accuracy", higher_is_better=True, out=args.out,
           meta={"config": {k: str(v) for k, v in vars(args).items()}, "pool": len(pool), "subset": n, "eval_sentences": len(eval_rows)})

if __name__ == "__main__":
    main()
