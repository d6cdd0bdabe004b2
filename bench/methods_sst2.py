"""Every registered method on SST-2 with MiniLM-L6, same budget, beside PEFT and AdapterHub.

Each run is a fresh process (``bench/sst2_worker.py``) with the same data, loop, schedule and
evaluation; only the method implementation differs. PEFT runs in our venv; AdapterHub pins
transformers 4.x, so it runs in ``.venv-peers`` (``make peers``) and is skipped if that is
missing. Prints a markdown table (trainable parameters, dev accuracy, training examples/s, peak
RSS, and each method's speed relative to its peer) and writes a JSON file and a PNG plot.

    .venv/bin/python bench/methods_sst2.py                # all methods, 200 steps each
    .venv/bin/python bench/methods_sst2.py --only lora ia3 --steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "sst2_worker.py"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"

# name → (deltatune delta config or None for full fine-tuning, learning rate). Learning rates
# follow each method's usual range; the same rate is used for the peer implementations.
DELTATUNE_RUNS: dict[str, tuple[dict | None, float]] = {
    "full": (None, 5e-5),
    "lora": ({"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear"}, 1e-3),
    "lora_pissa": ({"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "init": "pissa"}, 1e-4),
    "lora_incremental": ({"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "rank_allocation": "incremental"}, 1e-3),
    "bottleneck": ({"method": "bottleneck", "placement": "sequential"}, 1e-3),
    "bottleneck_parallel": ({"method": "bottleneck", "placement": "parallel"}, 1e-3),
    # size 12 = AdapterHub's CompacterConfig default (reduction factor 32 of MiniLM's 384).
    "compacter": ({"method": "compacter", "size": 12}, 1e-2),  # 3e-3: 82.7 % at 300 steps, 1e-2: 84.9 % (session 4)
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 20}, 1e-2),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 20}, 3e-1),  # Lester et al.'s 0.3; 3e-2 reached 68 % at 80 steps
    "ia3": ({"method": "ia3"}, 1e-2),  # 3e-3 was too slow (59 % at 80 steps)
    "ssf": ({"method": "ssf"}, 3e-3),
    "bitfit": ({"method": "bitfit"}, 3e-3),
    "norm_tuning": ({"method": "norm_tuning"}, 3e-3),
    "lofit": ({"method": "lofit"}, 1e-2),  # 3k trained numbers: 3e-3 gave 67 % at 150 steps
    "bundle": ({"method": "bundle"}, 1e-3),
}
PEER_RUNS = {
    "peft": ["lora", "ia3", "prefix_tuning", "prompt_tuning"],
    "adapters": ["lora", "bottleneck", "bottleneck_parallel", "compacter", "ia3", "prefix_tuning", "prompt_tuning"],
}


def run_one(impl: str, method: str, seed: int, args) -> dict | None:
    config, lr = DELTATUNE_RUNS[method]
    python = str(PEERS_PYTHON) if impl == "adapters" else sys.executable
    cmd = [python, str(WORKER), "--impl", impl, "--method", method, "--lr", str(lr), "--steps", str(args.steps),
           "--train-examples", str(args.train_examples), "--eval-examples", str(args.eval_examples), "--data", args.data,
           "--threads", str(args.threads), "--seed", str(seed)]
    if impl == "deltatune" and config is not None:
        cmd += ["--config", json.dumps(config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  {impl}/{method} seed {seed}: FAILED ({tail[0][:200]})", flush=True)
        return {"impl": impl, "method": method, "seed": seed, "error": tail[0][:500]}
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {impl}/{method} seed {seed}: acc {result['accuracy']:.3f}, {result['examples_per_s']:.1f} ex/s, "
          f"{result['peak_rss_gb']:.2f} GB ({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def mean_over_seeds(runs: list[dict]) -> dict:
    """One row per (impl, method): the mean of its seeds' numbers, with the accuracies kept for the spread."""
    row = dict(runs[0])
    for key in ("accuracy", "examples_per_s", "peak_rss_gb"):
        row[key] = sum(r[key] for r in runs) / len(runs)
    row["accuracies"] = [r["accuracy"] for r in runs]
    return row


def table(results: list[dict]) -> str:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if "error" not in r:
            grouped.setdefault((r["impl"], r["method"]), []).append(r)
    by = {key: mean_over_seeds(runs) for key, runs in grouped.items()}
    full = by.get(("deltatune", "full"))
    rows = ["| method | impl | trainable params | dev accuracy | Δ vs full FT | train examples/s | speed vs deltatune | peak RSS (GB) |",
            "|---|---|---|---|---|---|---|---|"]
    for method in DELTATUNE_RUNS:
        for impl in ("deltatune", "peft", "adapters"):
            r = by.get((impl, method))
            if r is None:
                failed = next((x for x in results if x["impl"] == impl and x["method"] == method and "error" in x), None)
                if failed:
                    rows.append(f"| {method} | {impl} | – | failed: {failed['error'][:80]} | | | | |")
                continue
            ours = by.get(("deltatune", method))
            delta_full = f"{100 * (r['accuracy'] - full['accuracy']):+.1f}" if full else "–"
            speed = f"{ours['examples_per_s'] / r['examples_per_s']:.2f}x" if ours and impl != "deltatune" else ""
            accuracy = f"{100 * r['accuracy']:.1f} %"
            if len(r["accuracies"]) > 1:  # mean (min–max over n seeds)
                accuracy += f" ({100 * min(r['accuracies']):.1f}–{100 * max(r['accuracies']):.1f}, {len(r['accuracies'])} seeds)"
            rows.append(f"| {method} | {impl} | {r['trainable']:,} | {accuracy} | {delta_full} | "
                        f"{r['examples_per_s']:.1f} | {speed} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"deltatune": "o", "peft": "s", "adapters": "^"}
    for r in results:
        if "error" in r:
            continue
        ax.scatter(r["trainable"], 100 * r["accuracy"], marker=markers[r["impl"]], label=r["impl"])
        ax.annotate(r["method"], (r["trainable"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM-L6 on SST-2, same budget per method")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="method names (default: all)")
    parser.add_argument("--peers", nargs="*", default=["peft", "adapters"])
    parser.add_argument("--no-deltatune", dest="deltatune", action="store_false",
                        help="run only the peers' implementations (e.g. to complete an earlier deltatune-only run)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds per run (data order, head and delta init); the table shows the mean and range")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1: examples/s comparable)")
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods_sst2.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "methods_sst2.png"))
    args = parser.parse_args()

    import deltatune

    registered = set(deltatune.list_methods())
    methods = args.only or list(DELTATUNE_RUNS)
    peers = [p for p in args.peers if p != "adapters" or PEERS_PYTHON.exists()]
    if "adapters" in args.peers and "adapters" not in peers:
        print("AdapterHub skipped: .venv-peers is missing (make peers)")
    runs = []
    for method in methods:
        config, _ = DELTATUNE_RUNS[method]
        if config is not None and config["method"] not in registered:
            print(f"  deltatune/{method}: skipped, method {config['method']!r} is not registered")
            continue
        for seed in args.seeds:
            if args.deltatune:
                runs.append(("deltatune", method, seed))
            runs += [(peer, method, seed) for peer in peers if method in PEER_RUNS[peer]]
    # --jobs > 1 runs several processes at once: faster on a shared machine, but then examples/s
    # are only comparable within one run of the script, not to a quiet machine.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda run: run_one(*run, args), runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    plot(results, Path(args.plot))
    print()
    print(table(results))
    print(f"\nresults: {out}\nplot: {args.plot}")


if __name__ == "__main__":
    main()
