"""The public functions, thin on purpose: each delegates to the module that does the work."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta_model import DeltaModel
from deltatune.models.load import load_model, load_tokenizer

__all__ = ["attach", "load_delta", "load_model", "load_tokenizer", "save_delta"]


def attach(model: nn.Module, config: DeltaConfig | dict[str, Any], name: str = "default") -> DeltaModel:
    """Attach a delta (a config object or a plain dict with a ``method`` key) to ``model``.

    The base weights are frozen; the new delta is active and trainable. Returns the
    :class:`DeltaModel` facade, which is called exactly like ``model``.
    """
    return DeltaModel.of(model).attach(config, name=name)


def load_delta(model: nn.Module, path: str | Path, name: str | None = None) -> DeltaModel:
    """Load a saved delta (deltatune's or PEFT's files) onto ``model`` and make it active.

    ``name`` defaults to ``"default"``, or the directory name if ``"default"`` is taken.
    """
    from deltatune.core.state import load_delta_dir

    facade = DeltaModel.of(model)
    if name is None:
        name = "default" if "default" not in facade.delta_configs else Path(path).name
        base_name, i = name, 2
        while name in facade.delta_configs:
            name, i = f"{base_name}-{i}", i + 1
    load_delta_dir(facade, path, name)
    return facade


def save_delta(model: DeltaModel, path: str | Path, name: str | None = None) -> None:
    model.save_delta(str(path), name)
