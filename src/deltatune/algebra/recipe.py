"""The merge recipe: YAML → one validated, frozen :class:`MergeRecipe`.

    base: smollm2-135m-instruct          # alias, GGUF file or HF directory (optional for linear / soups)
    inputs:
      - {path: runs/math/model, weight: 1.0}
      - {path: runs/code/adapter, weight: 0.5, density: 0.3}
    method: ties                         # task_arithmetic | ties | dare_linear | dare_ties | linear | greedy_soup | …
    parameters: {density: 0.2, lambda: 1.0}
    lines: {alpha: 0.0, beta: 1.0}       # optional LiNeS layer scaling of the merged task vector
    lora: {mode: concat}                 # LoRA adapters → one adapter: concat (exact) | svd (rank r)
    eval: {data: dev.tsv, task: sequence-classification, metric: accuracy}   # greedy soup
    output: {path: out/merged}           # HF directory; an adapter directory for LoRA merges; format: sparse

Errors name the file, line and dotted key, with the closest valid key (as training recipes do).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from deltatune.algebra.ops import MODEL_OPS, OPS, list_ops
from deltatune.core.config import StrictConfig
from deltatune.core.recipe_file import read_recipe_file, validate_recipe
from deltatune.utils.errors import did_you_mean


class InputSpec(StrictConfig):
    path: str
    weight: float = 1.0
    density: float | None = Field(None, gt=0, le=1)


class MergeParameters(StrictConfig):
    """Options of the generalized task arithmetic (see :mod:`deltatune.algebra.ops`); unset = the method's default."""

    density: float | None = Field(None, gt=0, le=1)
    lambda_: float | None = Field(None, alias="lambda")
    normalize: bool | None = None
    rescale: bool | None = None
    sparsify: Literal["magnitude", "random"] | None = None
    consensus: Literal["sum", "count"] | None = None
    seed: int = 0
    heads: bool = False  # ot_fusion: also align BERT attention heads (not only FFN units)


class LinesConfig(StrictConfig):
    """LiNeS (Wang et al., 2024): scale layer l's task vector by α + β·l/(L−1); shallow layers move
    less from the base. Tensors outside the layer stack: embeddings get α, the rest (final norm, head) α+β."""

    alpha: float = Field(0.0, ge=0)
    beta: float = Field(1.0, ge=0)


class LoraMergeConfig(StrictConfig):
    mode: Literal["concat", "svd"] = "concat"
    rank: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _rank(self) -> "LoraMergeConfig":
        if self.mode == "svd" and self.rank is None:
            raise ValueError("lora.mode svd needs lora.rank (the rank of the merged adapter)")
        return self


class MergeEvalConfig(StrictConfig):
    """Held-out data for greedy soups, read by the training data pipeline."""

    data: str
    task: Literal["causal-lm", "sequence-classification"] = "sequence-classification"
    num_labels: int | None = None
    metric: Literal["accuracy", "macro_f1", "loss", "exact_match"] = "accuracy"
    format: str = "auto"
    max_examples: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)


class OutputSpec(StrictConfig):
    path: str
    format: Literal["auto", "hf", "adapter", "sparse"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    density: float | None = Field(None, gt=0, le=1)   # sparse output: keep this top share of each merged task vector


class MergeRecipe(StrictConfig):
    base: str | None = None
    inputs: list[InputSpec] = Field(min_length=1)
    method: str
    parameters: MergeParameters = MergeParameters()
    lines: LinesConfig | None = None
    lora: LoraMergeConfig | None = None
    eval: MergeEvalConfig | None = None
    output: OutputSpec

    @model_validator(mode="after")
    def _consistent(self) -> "MergeRecipe":
        known = list_ops()
        if self.method not in known:
            raise ValueError(f"unknown merge method {self.method!r}{did_you_mean(self.method, known)}; available: {', '.join(known)}")
        model_op = MODEL_OPS.get(self.method)
        total = sum(i.weight for i in self.inputs)
        if (model_op is None or model_op.weighted) and math.isclose(total, 0.0, abs_tol=1e-12):
            raise ValueError(f"input weights sum to 0 ({[i.weight for i in self.inputs]}): the merge would be undefined / vanish; give a non-zero total weight")
        needs_base = self.method in OPS and OPS[self.method].needs_base
        if needs_base and self.base is None:
            raise ValueError(f"method {self.method!r} merges task vectors (input − base): set 'base'")
        if model_op is not None and model_op.needs_eval and self.eval is None:
            raise ValueError(f"method {self.method} needs an eval section (data, metric) to decide which models to add")
        return self

    def op_params(self, name: str = ""):
        """:class:`OpParams` for a tensor op: recipe values over the method's defaults."""
        from deltatune.algebra.ops import OpParams

        spec = OPS[self.method]
        d = spec.defaults
        p = self.parameters
        density = p.density if p.density is not None else d.get("density")
        densities = tuple(i.density if i.density is not None else (density or 1.0) for i in self.inputs)
        return OpParams(
            weights=tuple(i.weight for i in self.inputs),
            densities=densities,
            sparsify=p.sparsify if p.sparsify is not None else d.get("sparsify"),
            consensus=p.consensus if p.consensus is not None else d.get("consensus"),
            normalize=p.normalize if p.normalize is not None else d.get("normalize", False),
            lambda_=p.lambda_ if p.lambda_ is not None else 1.0,
            rescale=p.rescale if p.rescale is not None else True,
            seed=p.seed,
            name=name,
        )


def parse_recipe(data: dict, source: str = "<recipe>", lines: dict | None = None) -> MergeRecipe:
    return validate_recipe(MergeRecipe, data, source, lines or {})


def load_merge_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a merge recipe; relative paths in it stay relative to the working directory."""
    data, lines = read_recipe_file(path, "merge recipe", "base, inputs, method, output")
    return parse_recipe(data, str(path), lines)
