"""GOT-D at scale: time and peak memory of the OT step for a pool of N candidates (issue 8:
"scales to 100k candidates on this machine").

The embeddings are synthetic — unit vectors in 384 dimensions (MiniLM's width) drawn around
``--clusters`` random centres, the target sample from a few of those centres — so the run
measures the selection itself (mini-batched Sinkhorn over ``batch_size`` chunks, ranking), not
the encoder. The encoder's own cost is linear in the pool: 60,614 SST-2 sentences take 2 min 33 s
here (docs/benchmarks.md). The pool file is real JSONL read and checked by the pipeline.

    .venv/bin/python bench/got_d_scale.py --sizes 25000 50000 100000
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch




def clustered(n: int, centres: torch.Tensor, which: list[int], spread: float, g: torch.Generator) -> torch.Tensor:
    ids = torch.tensor(which)[torch.randint(len(which), (n,), generator=g)]
    return torch.nn.functional.normalize(centres[ids] + spread * torch.randn(n, centres.shape[1], generator=g), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    p.add_argument("--target", type=int, default=2000)
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from deltatune.select import get_strategy, prepare, validate_select_recipe

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(args.clusters, 384, generator=g), dim=-1)
    target = clustered(args.target, centres, [0, 1, 2], 0.04, g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tgt_path = Path(tmp) / "target.jsonl"
        tgt_path.write_text("".join(json.dumps({"text": f"target {i}"}) + "\n" for i in range(args.target)))
        for n in args.sizes:
            pool_path = Path(tmp) / f"pool{n}.jsonl"
            pool_path.write_text("".join(json.dumps({"text": f"candidate {i}"}) + "\n" for i in range(n)))
            pool = clustered(n, centres, list(range(args.clusters)), 0.04, g)
            recipe = validate_select_recipe({"strategy": {"name": "got_d"}, "pool": {"path": str(pool_path)}, "target": {"path": str(tgt_path)},
                                             "budget": args.budget, "progress": False, "output": {"path": str(Path(tmp) / "out.jsonl")}})
            ctx = prepare(recipe)
            ctx._cache["pool"], ctx._cache["target"] = pool, target  # embeddings given: the OT step is what is timed
            start = time.perf_counter()
            sel = get_strategy("got_d").select(ctx, recipe.strategy_config())
            seconds = time.perf_counter() - start
            hit = sum(1 for i in sel.indices if int((pool[i] @ centres.T).argmax()) in (0, 1, 2)) / len(sel.indices)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append({"candidates": n, "seconds": round(seconds, 2), "chunks": sel.summary["chunks"], "peak_rss_mb": round(rss),
                         "selected": len(sel.indices), "selected_from_target_clusters": round(hit, 4)})
            print(rows[-1], flush=True)
    print("\n| candidates | OT chunks | GOT-D seconds | peak RSS (process) | selected from the target's clusters |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidates']:,} | {r['chunks']} | {r['seconds']:.1f} | {r['peak_rss_mb']} MB | {r['selected_from_target_clusters']:.1%} |")


if __name__ == "__main__":
    main()
