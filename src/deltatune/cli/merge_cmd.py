"""``deltatune merge RECIPE``: combine fine-tuned models and deltas as a merge recipe says."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned models / deltas (task arithmetic, TIES, DARE, soups, LiNeS, LoRA-aware)")
    p.add_argument("recipe", help="merge recipe (YAML): base, inputs, method, parameters, output")
    p.add_argument("--out", help="override output.path")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from deltatune.algebra.merge import run_merge
    from deltatune.algebra.recipe import load_merge_recipe

    recipe = load_merge_recipe(args.recipe)
    if args.out:
        recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"path": args.out})})
    report = run_merge(recipe, log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"merged {len(recipe.inputs)} input(s) with {recipe.method} -> {report['output']} ({report.get('format', 'hf')}, {report.get('seconds', 0)} s)")
    return 0
