"""``deltatune train [recipe.yaml] [key.path=value …] [--resume RUN_DIR] [--print-config]``."""
from __future__ import annotations

from importlib import resources


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a delta from a recipe (no recipe: the built-in default job)")
    p.add_argument("recipe", nargs="?", help="recipe YAML; omit for the built-in default job")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 delta.r=8")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(run=run)


def default_recipe() -> dict:
    import yaml

    return yaml.safe_load(resources.files("deltatune.train").joinpath("default_recipe.yaml").read_text())


def run(args) -> int:
    from deltatune.train.config import load_recipe, recipe_to_yaml

    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path and "=" in recipe_path and not recipe_path.endswith((".yaml", ".yml")):
        recipe_path, overrides = None, [recipe_path, *overrides]  # `deltatune train optim.lr=1e-3`
    recipe = load_recipe(recipe_path, overrides, default=default_recipe())
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    from deltatune.train.loop import train

    result = train(recipe, resume=args.resume)
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from deltatune.train.loop import format_metrics

    before, after = result.get("before"), result["after"]
    print()
    if before:
        print(f"{'metric':<14}{'before':>12}{'after':>12}")
        for key in after:
            b, a = before.get(key), after[key]
            pct = key in ("exact_match", "accuracy", "macro_f1")
            fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.4f}")
            print(f"{key:<14}{fmt(b) if b is not None else '-':>12}{fmt(a):>12}")
    else:
        print("after training: " + format_metrics(after))
    if "adapter" in result:
        print(f"delta written to {result['adapter']}; loss curve {result['plot']}; metrics {result['run_dir']}/metrics.jsonl")
    if before and "exact_match" in after:
        print(f"exact match: before {100 * before['exact_match']:.1f}% -> after {100 * after['exact_match']:.1f}%")
