"""The data section of a recipe: where the examples come from and how they become tokens.

One frozen, validated :class:`DataConfig`; cross-field checks live here so a bad combination
fails when the recipe is read, before a tokenizer or a model is loaded.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from deltatune.core.config import StrictConfig
from deltatune.utils.errors import did_you_mean

Format = Literal["auto", "text", "instruction", "chat", "classification"]
Template = Literal["auto", "chat", "alpaca", "plain"]

# Canonical field names each format reads; ``columns`` maps them onto a file's own names.
CANONICAL_FIELDS = ("text", "text_pair", "label", "instruction", "input", "output", "prompt", "response", "system", "messages")


class AugmentConfig(StrictConfig):
    """EDA augmentation of the training records (deltatune.select.augment): ``copies`` augmented
    versions of each record's text field, operations taken in turn, from one seeded RNG."""

    ops: list[Literal["synonym", "insert", "swap", "delete"]] = ["synonym", "insert", "swap", "delete"]
    alpha: float = Field(0.1, gt=0, le=0.5)
    copies: int = Field(2, ge=1)
    field: str = "text"  # canonical field (data.columns maps it to the file's column)
    seed: int = 0


class DataConfig(StrictConfig):
    """How to read, render, tokenize and split one data set.

    Sources (``path``): ``.jsonl``, ``.json`` (a list of objects), ``.csv``, ``.tsv``,
    ``.parquet``, ``.txt`` (one ``text`` record per non-empty line), a directory written by
    ``datasets.Dataset.save_to_disk``, or a Hugging Face hub data set id (any path that does
    not exist locally and has no file suffix; ``subset`` is its config name, ``split`` its split).

    Delimited files: ``header: false`` reads files without a header line (e.g. CoLA); the
    columns are then ``column_names`` if given, else ``"0"``, ``"1"``, … so that
    ``columns: {text: "3", label: "1"}`` selects them. ``quoting: auto`` honours ``"`` quotes in
    ``.csv`` but not in ``.tsv``, where GLUE-style files contain bare, unbalanced quotes.

    ``columns`` maps canonical field names (``text``, ``text_pair``, ``label``, ``instruction``,
    ``input``, ``output``, ``prompt``, ``response``, ``system``, ``messages``) to the file's
    column names, e.g. ``{"instruction": "question", "output": "answer"}``.

    Evaluation data comes from ``eval_path`` (with ``eval_split``), from ``eval_split`` of the
    same source, or from ``eval_fraction`` of the training records, held out by a seeded
    permutation so the same seed gives the same split.
    """

    path: str | None = None
    format: Format = "auto"
    template: Template = "auto"
    split: str = "train"
    subset: str | None = None
    eval_path: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0
    columns: dict[str, str] = {}
    header: bool = True
    column_names: list[str] | None = None
    quoting: Literal["auto", "csv", "none"] = "auto"
    max_length: int = 512
    truncation: bool = True
    train_on_prompt: bool = False
    add_eos: bool = True
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    label_names: list[str] | None = None
    max_examples: int | None = None
    max_eval_examples: int | None = None
    shuffle: bool = True
    augment: AugmentConfig | None = None  # training records only; evaluation data is never augmented

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in CANONICAL_FIELDS:
                raise ValueError(
                    f"unknown field {key!r}{did_you_mean(key, CANONICAL_FIELDS)}; "
                    f"expected one of {', '.join(CANONICAL_FIELDS)}"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction > 0 and (self.eval_path or self.eval_split):
            raise ValueError("set either eval_fraction or eval_path/eval_split, not both")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        for name in ("max_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive count, got {value}")
        if self.packing and self.format == "classification":
            raise ValueError("packing applies to language-modelling formats, not classification")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names has duplicates: {self.label_names}")
        if self.column_names is not None and self.header:
            raise ValueError("column_names is only used with header: false (the header line names the columns)")
        return self
