"""``deltatune select select.yaml [key.path=value …]``: choose training data from a pool."""
from __future__ import annotations

STRATEGY_HELP = ("got_d (OT toward a target sample), grape (most likely response per instruction), diversity (k-means clusters), "
                 "quality (linear rule over indicators), dedup (exact + embedding near-duplicates)")


def add_parser(sub) -> None:
    p = sub.add_parser("select", help="select training data from a pool (strategies: got_d, grape, diversity, quality, dedup)",
                       description=f"Strategies: {STRATEGY_HELP}. Writes the selected records (JSONL) and a report (JSON) of why each was kept.")
    p.add_argument("recipe", help="selection recipe YAML (strategy, pool, target, budget, embedding, output)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget=0.1 strategy.reg=0.05 output.path=sel.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.select import load_select_recipe, run_selection

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    result = run_selection(load_select_recipe(args.recipe, overrides))
    cached = " (embeddings from cache)" if result.embeddings_computed == 0 else ""
    print(f"selected {len(result.selection.indices)} of {result.pool_size} in {result.seconds:.1f}s{cached}: "
          f"{result.output}; report {result.report}")
    return 0
