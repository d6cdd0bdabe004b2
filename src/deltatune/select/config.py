"""The selection recipe: YAML → one validated, frozen :class:`SelectRecipe`.

    strategy: {name: got_d, reg: 0.05}     # strategy name + that strategy's own options
    pool: {path: pool.jsonl}               # candidates (any file deltatune.data reads)
    target: {path: target.jsonl}           # got_d, diversity mode target: a small sample of the target task
    budget: 0.05                           # a count (int >= 1) or a fraction of the pool (0 < x < 1)
    embedding: {model: minilm-l6}          # any sentence encoder by name
    model: {name: smollm2-135m-instruct}   # scoring model for grape / quality / diversity (loss mode)
    output: {path: selected.jsonl}         # + selected.report.json beside it unless report is set

Errors name the file, line and key, as for training recipes (the same YAML/override helpers).
The ``strategy`` section is validated by the strategy's own config class, so a typo in a
strategy option names the closest valid option.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from deltatune.core.config import StrictConfig
from deltatune.data.config import CANONICAL_FIELDS, Format
from deltatune.core.recipe_file import apply_overrides, read_recipe_file, validate_recipe
from deltatune.utils.errors import ConfigError, did_you_mean


class SourceSection(StrictConfig):
    """One data source: the reader options of :class:`deltatune.data.config.DataConfig` that apply."""

    path: str
    format: Format = "auto"
    columns: dict[str, str] = {}
    split: str = "train"
    subset: str | None = None
    header: bool = True
    column_names: list[str] | None = None
    quoting: Literal["auto", "csv", "none"] = "auto"

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in CANONICAL_FIELDS:
                raise ValueError(f"unknown field {key!r}{did_you_mean(key, CANONICAL_FIELDS)}; expected one of {', '.join(CANONICAL_FIELDS)}")
        return value


class EmbeddingSection(StrictConfig):
    model: str = "minilm-l6"
    batch_size: int = Field(64, gt=0)
    max_length: int = Field(128, ge=2)
    cache_dir: str | None = None  # default: $DELTATUNE_CACHE/embeddings or ~/.cache/deltatune/embeddings
    threads: int | None = Field(None, gt=0)
    # bfloat16: about 2x faster on CPUs with AVX512-BF16/AMX; cosines move by ~1e-2 (part of the cache key).
    dtype: Literal["float32", "bfloat16"] = "float32"


class ScoringModelSection(StrictConfig):
    name: str = "smollm2-135m-instruct"
    delta: str | None = None  # a saved delta directory: score with the *current* (adapted) model
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, ge=2)


class OutputSection(StrictConfig):
    path: str = "selected.jsonl"
    report: str | None = None  # default: <path stem>.report.json beside the selection

    def report_path(self) -> Path:
        p = Path(self.path)
        return Path(self.report) if self.report else p.with_name(p.stem + ".report.json")


class SelectRecipe(StrictConfig):
    strategy: dict[str, Any]  # {"name": ..., options}; validated by the strategy's config class
    pool: SourceSection
    target: SourceSection | None = None
    budget: int | float | None = None
    seed: int = 0
    embedding: EmbeddingSection = EmbeddingSection()
    model: ScoringModelSection = ScoringModelSection()
    output: OutputSection = OutputSection()
    progress: bool = True

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return value
        if isinstance(value, bool):
            raise ValueError("budget must be a count or a fraction, not a boolean")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"budget must be a count >= 1 or a fraction in (0, 1), got {value}")
        if isinstance(value, float) and not 0.0 < value < 1.0:
            if value.is_integer() and value >= 1:
                return int(value)
            raise ValueError(f"budget must be a count >= 1 or a fraction in (0, 1), got {value}")
        return value

    def strategy_config(self):
        from deltatune.select.registry import parse_strategy_config

        return parse_strategy_config(self.strategy)


def load_select_recipe(path: str | Path, overrides: list[str] = ()) -> SelectRecipe:
    """Read, override and validate a selection recipe (strategy options included)."""
    data, lines = read_recipe_file(path, "selection recipe", "strategy, pool, budget, output, …")
    data = apply_overrides(copy.deepcopy(data), list(overrides))
    if isinstance(data.get("strategy"), str):  # `strategy: dedup` is short for `strategy: {name: dedup}`
        data["strategy"] = {"name": data["strategy"]}
    return validate_select_recipe(data, str(path), lines)


def validate_select_recipe(data: dict[str, Any], source: str = "<recipe>", lines: dict[tuple, int] | None = None) -> SelectRecipe:
    lines = lines or {}
    recipe = validate_recipe(SelectRecipe, data, source, lines)
    try:
        recipe.strategy_config()
    except ConfigError as err:
        line = lines.get(("strategy",))
        raise ConfigError(f"{source}:{line}: {err}" if line else f"{source}: {err}") from None
    return recipe
