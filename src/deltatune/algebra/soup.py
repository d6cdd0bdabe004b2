"""Model soups (Wortsman et al., 2022) that need an evaluation: the greedy soup.

Uniform soup = the ``linear`` op with equal weights (streamed like any merge). Greedy soup::

    rank the inputs by their own held-out metric, best first
    soup = [best]
    for each next input: if metric(mean(soup + [input])) >= metric(mean(soup)): soup += [input]

Scores come from the training code's own evaluation (:func:`deltatune.train.loop.evaluate`) on data
read by the data pipeline, so a soup is scored exactly as ``deltatune eval`` scores a model. Memory:
the evaluated model, the running sum of the soup and one candidate (three models).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltatune.utils.errors import ConfigError
from deltatune.utils.io import atomic_dir


class Evaluator:
    """Data prepared once; :meth:`score` evaluates a model (optionally with new weights) on it."""

    def __init__(self, model: str, data: str, task: str, num_labels: int | None = None, max_examples: int | None = None,
                 metric: str = "auto", batch_size: int = 32, fmt: str = "auto"):
        import deltatune
        from deltatune.train.config import load_recipe
        from deltatune.train.setup import build_model, prepare_data

        metric = "auto" if metric in ("macro_f1", "accuracy") and task == "sequence-classification" else metric
        self.recipe = load_recipe(None, default={
            "model": {"name": str(model), "task": task, "num_labels": num_labels},
            "delta": None,
            "data": {"path": str(data), "eval_path": str(data), "max_eval_examples": max_examples, "max_examples": max_examples, "format": fmt, "shuffle": False},
            "eval": {"metric": metric, "batch_size": batch_size},
            "train": {"progress": False},
        })
        self.tokenizer = deltatune.load_tokenizer(model)
        self.data = prepare_data(self.recipe, self.tokenizer, run_dir=None, write=False)
        self.model = build_model(self.recipe, self.data.report.num_labels)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def score(self, state: dict[str, torch.Tensor] | None = None, adapter: str | None = None) -> dict[str, float]:
        import deltatune
        from deltatune.train.loop import evaluate
        from deltatune.train.objective import CausalLMObjective, ClassificationObjective

        model = self.model
        if state is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise ConfigError(f"soup weights do not fit the evaluated model: unexpected tensor {unexpected[0]!r}")
        if adapter is not None:
            model = deltatune.load_delta(model, adapter, name="scored")
        try:
            classification = self.recipe.model.task == "sequence-classification"
            objective = ClassificationObjective(model) if classification else CausalLMObjective(model)
            return evaluate(model, objective, self.data, self.recipe, self.tokenizer)
        finally:
            if adapter is not None:
                model.detach("scored")


def evaluate_model_dir(model: str, data: str, task: str, num_labels: int | None = None, max_examples: int | None = None, adapter: str | None = None) -> dict:
    return Evaluator(model, data, task, num_labels, max_examples).score(adapter=adapter)


def _weights(path: str) -> dict[str, torch.Tensor]:
    from deltatune.algebra.stream import checkpoint_files

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(Path(path)):
        out.update(load_file(str(f)))
    return out


def greedy_soup(recipe, log=print) -> dict:
    """Run a ``greedy_soup`` recipe (full model directories) and write the soup as a HF directory."""
    from deltatune.algebra.merge import copy_model_files
    from deltatune.algebra.task_vector import check_full_inputs

    paths = [spec.path for spec in recipe.inputs]
    check_full_inputs(paths, "greedy_soup")  # same architecture and shapes, before any evaluation
    ev = recipe.eval
    metric = ev.metric
    lower_is_better = metric == "loss"
    evaluator = Evaluator(paths[0], ev.data, ev.task, ev.num_labels, ev.max_examples, metric, ev.batch_size, ev.format)

    def value(metrics: dict) -> float:
        if metric not in metrics:
            raise ConfigError(f"eval.metric {metric!r} is not produced for task {ev.task!r}; got {sorted(metrics)}")
        return -metrics[metric] if lower_is_better else metrics[metric]

    individual = {p: value(evaluator.score(_weights(p))) for p in paths}
    order = sorted(paths, key=lambda p: -individual[p])
    members = [order[0]]
    total = {k: v.float() for k, v in _weights(order[0]).items()}
    best = individual[order[0]]
    for p in order[1:]:
        cand = _weights(p)
        trial = {k: (total[k] + cand[k].float()) / (len(members) + 1) for k in total}
        score = value(evaluator.score(trial))
        log(f"greedy soup: {p}: {metric} {abs(score):.4f} vs {abs(best):.4f} -> {'add' if score >= best else 'skip'}")
        if score >= best:
            members.append(p)
            best = score
            for k in total:
                total[k] += cand[k].float()
        del cand, trial
    dtypes = {k: v.dtype for k, v in _weights(order[0]).items()}
    soup = {k: (v / len(members)).to(dtypes[k]).contiguous() for k, v in total.items()}
    report = {"output": recipe.output.path, "format": "hf", "method": "greedy_soup", "metric": metric,
              "individual": {p: abs(v) for p, v in individual.items()}, "members": members, "soup": abs(best)}
    with atomic_dir(recipe.output.path) as tmp:
        save_file(soup, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_model_files(Path(paths[0]), tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
