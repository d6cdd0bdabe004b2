"""Load a pretrained model and tokenizer from an alias, a local HF directory, a GGUF file or a hub id.

``load_model`` returns a plain ``transformers`` model, so everything in that ecosystem (PEFT
included) works on it. Loading errors become one-line :class:`ModelLoadError` messages.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import torch

from deltatune.models.aliases import ALIASES, resolve_alias
from deltatune.models.gguf_cache import converted_dir
from deltatune.utils.errors import ModelLoadError, did_you_mean, one_line

Task = Literal["causal-lm", "sequence-classification", "encoder"]
TASKS = ("causal-lm", "sequence-classification", "encoder")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """``(path or hub id, is_local)``; a GGUF file resolves to its cached HF directory."""
    text = str(name_or_path)
    alias_path = resolve_alias(text)
    path = alias_path if alias_path is not None else Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {str(path)!r}: expected a .gguf file or a model directory")
        return str(converted_dir(path)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json; expected a Hugging Face model directory")
        return str(path), True
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return text, False
    raise ModelLoadError(
        f"model {text!r} not found: no such file or directory, not a built-in alias{did_you_mean(text, ALIASES)} "
        f"(aliases: {', '.join(ALIASES)}), and not a hub id of the form 'org/name'"
    )


def prepare_model(name_or_path: str | os.PathLike, task: Task | None = None, num_labels: int | None = None, revision: str | None = None):
    """Resolve the source, read its config and import the model class: everything before the weights.

    Returns ``(source, config, model_class)``. Split from :func:`load_model` so start-up cost
    (Python imports, GGUF conversion on a cache miss) and weight-loading time can be told apart.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    source, local = resolve_source(name_or_path)
    alias = ALIASES.get(str(name_or_path))
    task = task or (alias.task if alias else None)
    try:
        config = AutoConfig.from_pretrained(source, **({"revision": revision} if revision else {}))
    except Exception as err:
        raise _load_error(name_or_path, source, local, err) from None
    if task is None:
        task = "causal-lm" if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else "encoder"
    if task not in TASKS:
        raise ModelLoadError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "sequence-classification":
        if not num_labels or num_labels < 1:
            raise ModelLoadError("task 'sequence-classification' needs num_labels >= 1")
        config.num_labels = num_labels
        if config.pad_token_id is None and getattr(config, "eos_token_id", None) is not None:
            eos = config.eos_token_id
            config.pad_token_id = eos if isinstance(eos, int) else eos[0]
    auto = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification, "encoder": AutoModel}[task]
    try:
        model_class = auto._model_mapping[type(config)]
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"model {str(name_or_path)!r}: architecture {config.model_type!r} has no {task} head in transformers ({err})") from None
    return source, config, model_class


def load_model(
    name_or_path: str | os.PathLike,
    task: Task | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
):
    """A ``transformers`` model with the head for ``task``, in eval mode.

    ``task``: ``causal-lm`` (default for decoders), ``sequence-classification`` (needs
    ``num_labels``; the new head is randomly initialised) or ``encoder`` (no head).
    """
    source, config, model_class = prepare_model(name_or_path, task, num_labels, revision)
    kwargs = {"dtype": dtype, **({"revision": revision} if revision else {})}
    from transformers.utils import logging as hf_logging

    # Reading cached safetensors takes well under a second: its progress bar is noise.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(source, config=config, **kwargs)
    except Exception as err:
        raise _load_error(name_or_path, source, not source == str(name_or_path) or Path(source).exists(), err) from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.eval()
    return model


def _load_error(name_or_path, source: str, local: bool, err: Exception) -> ModelLoadError:
    where = "local model" if local else "hub model"
    return ModelLoadError(f"{where} {str(name_or_path)!r} ({source}) failed to load: {one_line(err)}")


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None):
    """The tokenizer of the model; a missing pad token is set to the EOS token."""
    from transformers import AutoTokenizer

    source, local = resolve_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"revision": revision} if revision else {}))
    except Exception as err:
        raise ModelLoadError(f"tokenizer of {str(name_or_path)!r} ({source}) failed to load: {one_line(err)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
