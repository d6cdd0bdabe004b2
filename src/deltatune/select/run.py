"""The selection pipeline: check everything → run the strategy → write selection + report.

    result = run_selection(load_select_recipe("select.yaml"))

Order matters: the recipe, the strategy options, the pool and target files (every record,
every text field, UTF-8, formats), the budget and the output path are all checked before any
model is loaded or any file is written. The selected records are written unchanged, in pool
order, as JSONL (``deltatune train recipe.yaml data.path=selected.jsonl`` reads them); the
report (JSON) lists every kept record with its origin, rank and the scores it was kept for.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.select.config import SelectRecipe
from deltatune.select.context import SelectionContext
from deltatune.select.embed import TextEmbedder
from deltatune.select.pool import check_target, read_pool, resolve_budget
from deltatune.select.registry import Selection, get_strategy
from deltatune.utils.errors import ConfigError, DataError
from deltatune.utils.io import atomic_path, write_json_atomic


@dataclass
class SelectionResult:
    selection: Selection
    output: Path
    report: Path
    pool_size: int
    seconds: float
    embeddings_computed: int  # texts run through the encoder (0 on a fully cached run)


def prepare(recipe: SelectRecipe) -> SelectionContext:
    """Every check that needs no model; returns the context a strategy runs in."""
    config = recipe.strategy_config()
    strategy = get_strategy(config.name)
    uses_target = strategy.uses_target(config)
    if uses_target and recipe.target is None:
        raise ConfigError(f"{strategy.describe(config)} needs a target sample: set target.path")
    if not uses_target and recipe.target is not None:
        raise ConfigError(f"{strategy.describe(config)} does not use a target sample; remove the target section")
    if strategy.needs_budget and recipe.budget is None:
        raise ConfigError(f"strategy {strategy.name!r} needs a budget: a count (e.g. 1000) or a fraction of the pool (e.g. 0.05)")
    out, report = Path(recipe.output.path), recipe.output.report_path()
    inputs = {Path(recipe.pool.path).resolve()} | ({Path(recipe.target.path).resolve()} if recipe.target else set())
    inputs |= {Path(path).resolve() for path in config.input_paths()}
    for p in (out, report):
        if p.resolve() in inputs:
            raise ConfigError(f"output {str(p)!r} is an input file; choose another output.path / output.report")
    if out.resolve() == report.resolve():
        raise ConfigError(f"output.path and output.report are the same file {str(out)!r}")
    pool = read_pool(recipe.pool, "pool")
    if strategy.formats is not None and pool.format not in strategy.formats:
        raise DataError(f"{pool.items[0].origin}: strategy {strategy.name!r} needs {' or '.join(strategy.formats)} data; the pool is {pool.format!r}")
    target = read_pool(recipe.target, "target sample") if recipe.target else None
    if target is not None:
        check_target(target, pool)
    budget = resolve_budget(recipe.budget, pool)
    return SelectionContext(recipe, pool, target, budget, TextEmbedder(recipe.embedding, progress=recipe.progress))


def run_selection(recipe: SelectRecipe) -> SelectionResult:
    start = time.perf_counter()
    ctx = prepare(recipe)
    strategy = get_strategy(recipe.strategy_config().name)
    selection = strategy.select(ctx, recipe.strategy_config())
    out, report_path = Path(recipe.output.path), recipe.output.report_path()
    kept = sorted(selection.indices)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for i in kept:
                f.write(json.dumps(ctx.pool.items[i].data, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - start
    write_json_atomic(report_path, build_report(recipe, ctx, selection, seconds))
    return SelectionResult(selection, out, report_path, len(ctx.pool), seconds, ctx.embedder.computed)


def build_report(recipe: SelectRecipe, ctx: SelectionContext, selection: Selection, seconds: float) -> dict[str, Any]:
    rank = {i: r for r, i in enumerate(selection.indices)}
    return {
        "strategy": recipe.strategy_config().model_dump(),
        "pool": {"path": ctx.pool.path, "format": ctx.pool.format, "size": len(ctx.pool)},
        "target": {"path": ctx.target.path, "size": len(ctx.target)} if ctx.target else None,
        "budget": ctx.budget,
        "selected": len(selection.indices),
        "output": recipe.output.path,
        "embedding_model": recipe.embedding.model,
        "seconds": round(seconds, 3),
        "reason": selection.reason,
        "summary": selection.summary,
        "examples": [{"index": i, "origin": ctx.pool.items[i].origin, "rank": rank[i], "scores": selection.scores.get(i, {})}
                     for i in sorted(selection.indices)],
    }
