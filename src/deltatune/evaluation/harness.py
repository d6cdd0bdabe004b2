"""lm-evaluation-harness (``lm-eval``) for deltatune models: a base with one or more deltas, merged or not.

Importing this module registers the model type ``deltatune`` with lm-eval. It is lm-eval's own
``HFLM`` over the base model with the deltas attached (deltatune wraps modules in place, so the
object lm-eval drives is the transformers model itself), so every lm-eval task and output type
works as it does for a plain Hugging Face model::

    from deltatune.evaluation.harness import run_tasks
    run_tasks("smollm2-135m-instruct", ["runs/a/adapter"], tasks=["my_task"], include_path="tasks/")

    # or lm-eval's own entry point, with the model type registered first:
    python -c "import deltatune.evaluation.harness, lm_eval.__main__ as m; m.cli_evaluate()" \\
        --model deltatune --model_args model=smollm2-135m-instruct,deltas=runs/a/adapter --tasks hellaswag

``deltas`` is a ``;``-separated list of delta directories, all active together; ``merge=true``
folds them into the base weights first (the function is the same; the speed is the base's).
``deltatune eval --lm-eval-task NAME [--lm-eval-include DIR]`` runs a named task the same way.
lm-eval is an optional dependency (``pip install lm-eval``).
"""
from __future__ import annotations

from pathlib import Path

from deltatune.utils.errors import ConfigError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # an optional dependency: say what to install, once, where it is used
    raise ConfigError("lm-eval is not installed: pip install lm-eval (deltatune's lock has a tested version)") from err

import deltatune


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("deltatune")
class DeltatuneLM(HFLM):
    """``model``: an alias, HF directory, GGUF file or hub id; ``deltas``: delta directories joined by ``;``."""

    def __init__(self, model: str, deltas: str | list[str] | None = None, merge: bool | str = False, batch_size: int | str = 1,
                 device: str = "cpu", **kwargs):
        paths = [p for p in (deltas.split(";") if isinstance(deltas, str) else deltas or []) if p]
        base = deltatune.load_model(model, task="causal-lm")
        names = []
        facade = None
        for path in paths:
            if not Path(path).is_dir():
                raise ConfigError(f"lm-eval deltatune model: delta directory {path!r} does not exist")
            facade = deltatune.load_delta(base, path)
            names.append(list(facade.delta_configs)[-1])
        if facade is not None:
            facade.set_active(names)
            if _as_bool(merge):
                facade.merge()
        self.delta_names = names
        super().__init__(pretrained=base, tokenizer=deltatune.load_tokenizer(model), batch_size=batch_size, device=device, **kwargs)


def run_tasks(model: str, deltas: list[str] | None, tasks: list[str], include_path: str | None = None, limit: int | float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, merge: bool = False, include_defaults: bool | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on a deltatune model; returns lm-eval's ``results`` per task.

    ``include_path``: a directory of task YAMLs besides lm-eval's own. ``include_defaults``: whether to
    index lm-eval's thousands of built-in tasks too (slow); None: only when a task is not found locally."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = DeltatuneLM(model, deltas=deltas, merge=merge, batch_size=batch_size)
    manager = None
    if include_path and include_defaults is not True:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if include_defaults is None and not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval task {unknown[0]!r} is not known (looked in lm-eval's tasks{' and ' + include_path if include_path else ''})")
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
                          bootstrap_iters=0)
    return out["results"]
