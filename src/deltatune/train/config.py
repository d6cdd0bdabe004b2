"""The training recipe: YAML → one validated, frozen :class:`TrainRecipe`.

Errors name the file, the line and the dotted key (``recipe.yaml:12: unknown key
'optim.learning_rate' (did you mean 'lr'?)``). Dotted command-line overrides
(``optim.lr=1e-4 delta.r=8``) are parsed as YAML scalars and applied before validation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import copy

import yaml
from pydantic import Field, model_validator

from deltatune.core.config import StrictConfig
from deltatune.core.recipe_file import apply_overrides, at, read_recipe_file, validate_recipe
from deltatune.core.registry import parse_delta_config
from deltatune.data.config import DataConfig
from deltatune.utils.errors import ConfigError


class ModelSection(StrictConfig):
    name: str = "smollm2-135m-instruct"
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    num_labels: int | None = None  # sequence-classification: taken from the data when unset
    # Start from this trained delta (deltatune or PEFT directory) and train it further; its own
    # config replaces the recipe's delta section (e.g. fine-tuning again after a warm-up).
    adapter: str | None = None


class GenerateSection(StrictConfig):
    """Data that deltatune generates itself (see :mod:`deltatune.tasks.numbers`)."""

    task: str | list[str] = "addition"
    n_train: int = Field(4000, gt=0)
    n_eval: int = Field(100, gt=0)
    digits: int = Field(3, ge=1, le=12)
    seed: int = 0


class GaloreOptions(StrictConfig):
    """GaLore: ``rank`` of the gradient subspace, refreshed every ``update_gap`` steps; ``scale`` α of the update;
    ``layerwise``: fuse the update into backward (see :mod:`deltatune.optim.galore`)."""

    rank: int = Field(128, gt=0)
    update_gap: int = Field(200, gt=0)
    scale: float = Field(0.25, gt=0)
    layerwise: bool = False  # update each weight inside backward and free its gradient (GaLore's per-layer update)


class LisaOptions(StrictConfig):
    """LISA: ``layers`` (γ) middle layers unfrozen at a time, re-sampled every ``interval`` (K) steps."""

    layers: int = Field(2, gt=0)
    interval: int = Field(20, gt=0)


class MezoOptions(StrictConfig):
    """MeZO: perturbation size ``eps``; Sparse MeZO perturbs the ``density`` share of smallest-|θ| entries."""

    eps: float = Field(1e-3, gt=0)
    density: float = Field(0.25, gt=0, le=1)


class OptimConfig(StrictConfig):
    """``name``: adamw, or a memory-efficient full fine-tuning optimizer (see :mod:`deltatune.optim`)."""

    name: Literal["adamw", "galore", "lisa", "lomo", "adalomo", "mezo", "sparse_mezo"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    galore: GaloreOptions = GaloreOptions()
    lisa: LisaOptions = LisaOptions()
    mezo: MezoOptions = MezoOptions()


class ScheduleConfig(StrictConfig):
    name: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TokenSelectionConfig(StrictConfig):
    """Train only on tokens whose loss exceeds an EMA "history" model's (ssToken; deltatune.select.token_select)."""

    keep_ratio: float | None = Field(0.6, gt=0, le=1)  # top fraction of targets by excess loss; None: all with excess > 0
    beta: float = Field(0.99, ge=0, lt=1)  # EMA decay of the history copy of the trainable parameters


class TrainLoopConfig(StrictConfig):
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, ge=1)
    bf16: bool = False
    compile: bool = False
    loss_chunk_size: int = Field(256, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    threads: int | None = Field(None, gt=0)
    # glibc mmap threshold; None: 4 MiB for adamw, 2 MiB for the memory-efficient optimizers
    # (smaller peak, some speed lost to page faults: deltatune.utils.memory.mmap_threshold_mb)
    malloc_mmap_threshold_mb: float | None = Field(None, gt=0)
    progress: bool = True
    token_selection: TokenSelectionConfig | None = None
    # Where the training log goes besides runs/<name>/metrics.jsonl: "tensorboard" also writes
    # event files to runs/<name>/tensorboard (needs the tensorboard package).
    report_to: Literal["none", "tensorboard"] = "none"


class EvalConfig(StrictConfig):
    metric: Literal["auto", "loss", "accuracy", "exact_match"] = "auto"
    max_new_tokens: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    max_batches: int | None = Field(None, gt=0)
    before_training: bool = False


class OutputConfig(StrictConfig):
    dir: str = "runs"
    name: str = "default"


class TrainRecipe(StrictConfig):
    model: ModelSection = ModelSection()
    delta: dict[str, Any] | None = {"method": "lora"}  # validated by the method's own config class
    data: DataConfig = DataConfig()
    generate: GenerateSection | None = None
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainRecipe":
        if self.data.path is None and self.generate is None:
            raise ValueError("no training data: set data.path (a file) or a generate section")
        if self.data.path is not None and self.generate is not None:
            raise ValueError("set either data.path or generate, not both")
        if self.eval.metric == "exact_match" and self.model.task != "causal-lm":
            raise ValueError("eval.metric exact_match needs model.task causal-lm")
        if self.eval.metric == "accuracy" and self.model.task != "sequence-classification":
            raise ValueError("eval.metric accuracy needs model.task sequence-classification")
        if self.model.adapter is not None and "delta" in self.model_fields_set and self.delta is not None:
            raise ValueError("model.adapter continues a trained delta, whose config is in its directory: "
                             "remove the delta section (or set delta: null)")
        if self.train.token_selection is not None and self.model.task != "causal-lm":
            raise ValueError("train.token_selection selects target tokens and needs model.task causal-lm")
        return self

    def delta_config(self):
        return None if self.delta is None else parse_delta_config(self.delta, where="delta")

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name


def load_recipe(path: str | Path | None, overrides: list[str] = (), default: dict[str, Any] | None = None) -> TrainRecipe:
    """Read, override and validate a recipe; ``path=None`` uses ``default`` (the built-in job)."""
    if path is None:
        data, lines, source = dict(default or {}), {}, "<built-in recipe>"
    else:
        data, lines = read_recipe_file(path, "recipe", "model, delta, data, …")
        source = str(path)
    data = apply_overrides(copy.deepcopy(data), list(overrides))
    recipe = validate_recipe(TrainRecipe, data, source, lines)
    try:
        recipe.delta_config()
    except ConfigError as err:
        raise ConfigError(f"{at(source, lines, ('delta',))}: {err}") from None
    return recipe


def recipe_to_yaml(recipe: TrainRecipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
