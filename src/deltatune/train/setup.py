"""Everything a run needs before its first step: data, model + delta, objective."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.data import BatchStream, build_datasets, load_records, make_collator
from deltatune.data.formats import ExampleEncoder, detect_format
from deltatune.train.config import TrainRecipe
from deltatune.utils.errors import ConfigError


@dataclass
class RunData:
    train: list
    eval: list
    report: Any
    generation_examples: list[dict]  # for exact match: rendered prompts + references
    data_config: Any


def prepare_data(recipe: TrainRecipe, tokenizer, run_dir: Path, write: bool) -> RunData:
    """Build (or generate) the data set; generated examples are written to ``run_dir/data``."""
    config = recipe.data
    if recipe.generate is not None:
        from deltatune.tasks.numbers import make_number_task, write_jsonl

        g = recipe.generate
        train, evals = make_number_task(g.task, g.n_train, g.n_eval, g.seed, g.digits)
        data_dir = run_dir / "data"
        train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
        if write:
            write_jsonl(train, train_path)
            write_jsonl(evals, eval_path)
        else:  # other ranks read what rank 0 wrote; the data are identical by seed anyway
            import time

            while not eval_path.exists():
                time.sleep(0.1)
        config = config.model_copy(update={"path": str(train_path), "eval_path": str(eval_path), "format": "instruction"})
    train, evals, report = build_datasets(config, tokenizer, seed=recipe.train.seed)
    generation = []
    if recipe.eval.metric == "exact_match":
        eval_path = config.eval_path or config.path
        records = load_records(config, eval_path, config.eval_split or config.split, config.max_eval_examples)
        if config.eval_path is None:
            from deltatune.data import split_records

            _, records = split_records(records, config.eval_fraction, recipe.train.seed)
        if not records:
            raise ConfigError("eval.metric exact_match needs eval data: set data.eval_path or data.eval_fraction")
        fmt = config.format if config.format != "auto" else detect_format(records[0], dict(config.columns))
        encoder = ExampleEncoder(config, tokenizer, fmt)
        generation = [encoder.generation_example(r) for r in records]
    return RunData(train, evals, report, generation, config)


def default_head_names(model) -> list[str]:
    """The classification head that must be trained in full when a new one was initialised."""
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return [name]
    return []


def build_model(recipe: TrainRecipe, num_labels: int | None):
    """The base model with the recipe's delta attached (or every weight trainable for ``delta: null``)."""
    import deltatune

    task = recipe.model.task
    if task == "sequence-classification":
        num_labels = recipe.model.num_labels or num_labels
        if not num_labels:
            raise ConfigError("model.num_labels is unset and the data did not give the number of labels")
    model = deltatune.load_model(recipe.model.name, task=task, num_labels=num_labels if task == "sequence-classification" else None)
    if recipe.model.adapter is not None:
        return deltatune.load_delta(model, recipe.model.adapter)  # loaded deltas are trainable, as attached ones are
    delta = recipe.delta_config()
    if delta is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if task == "sequence-classification" and not delta.modules_to_save:
        delta = delta.model_copy(update={"modules_to_save": default_head_names(model)})
    return deltatune.attach(model, delta)


def make_stream(recipe: TrainRecipe, data: RunData, tokenizer, model) -> BatchStream:
    dtype = next(model.parameters()).dtype
    collate = make_collator(tokenizer, packing=data.data_config.packing, mask_dtype=dtype)
    return BatchStream(data.train, batch_size=recipe.train.batch_size, seed=recipe.train.seed, collate=collate,
                       shuffle=data.data_config.shuffle)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; check the delta section of the recipe")
    return params
