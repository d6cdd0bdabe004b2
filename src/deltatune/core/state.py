"""Delta files: one directory per delta, readable by Hugging Face PEFT where PEFT has the method.

    adapter_config.json         PEFT's config (peft_type, r, lora_alpha, target_modules …)
    adapter_model.safetensors   tensors keyed ``base_model.model.<module>.<branch key>``
    deltatune.json              deltatune's own config for the delta (method + all fields)

This module is the one place that maps between deltatune names and file names. Loading reads
safetensors only and checks every module name and shape before a tensor is copied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import deltatune
from deltatune.core.config import DeltaConfig
from deltatune.core.full_copy import FULL_COPY_KEY
from deltatune.core.inject import iter_logical_modules
from deltatune.core.registry import get_method, list_methods, parse_delta_config
from deltatune.core.targets import compact_patterns, matches
from deltatune.utils.errors import DeltaFileError, ShapeMismatchError, closest, one_line
from deltatune.utils.io import atomic_dir

PEFT_PREFIX = "base_model.model."
PROMPT_LEARNING_PREFIX = "base_model."  # PEFT's prompt-learning files (prompt/prefix tuning with a head)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DELTATUNE_FILE = "deltatune.json"


def to_file_key(key: str, unprefixed: tuple[str, ...] = (), prefix: str = PEFT_PREFIX) -> str:
    """Internal key → file key. Full-copy modules are stored under the module's own key names
    (``classifier.weight``), as PEFT stores ``modules_to_save``; a method's ``unprefixed_keys``
    (PEFT's ``prompt_embeddings``) are stored without the module path."""
    for local in unprefixed:
        if key.endswith("." + local):
            return local
    return prefix + key.replace(f".{FULL_COPY_KEY}.", ".")


def from_file_key(key: str) -> str:
    for prefix in (PEFT_PREFIX, PROMPT_LEARNING_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def save_delta_dir(model, name: str, path: str | Path) -> None:
    """Write delta ``name`` of a DeltaModel to ``path`` atomically (a crash leaves the old dir)."""
    method = get_method(model.delta_configs[name].method)
    config: DeltaConfig = method.saved_config(model.delta_configs[name])
    tensors = {to_file_key(k, method.unprefixed_keys, method.file_prefix): v.detach().to("cpu").contiguous() for k, v in model.delta_state_dict(name).items()}
    base = model.base_model
    base_id = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    targets = [t for t in model.delta_targets[name] if t not in _modules_to_save(model, name)]
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if method.peft_type is not None:
            peft = method.to_peft_config(config, compact_patterns(base, targets), targets)
            peft.update({
                "base_model_name_or_path": base_id,
                "task_type": _peft_task_type(base, bool(config.modules_to_save)),
                "inference_mode": True,
                "revision": None,
                "peft_version": None,
            })
        else:
            peft = {"peft_type": None, "base_model_name_or_path": base_id}
        (tmp / CONFIG_FILE).write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n")
        own = {"deltatune_version": deltatune.__version__, "method": config.method, "config": config.model_dump(mode="json"), "modules": model.delta_targets[name]}
        (tmp / DELTATUNE_FILE).write_text(json.dumps(own, indent=2) + "\n")


def _modules_to_save(model, name: str) -> set[str]:
    return {k.rsplit("." + FULL_COPY_KEY + ".", 1)[0] for k in model.delta_state_dict(name) if f".{FULL_COPY_KEY}." in k}


def _peft_task_type(base, saves_modules: bool) -> str | None:
    """PEFT's task_type. Not SEQ_CLS/TOKEN_CLS for a delta without a trained head: PEFT would then
    expect the head's weights in the file (it adds the classifier to modules_to_save)."""
    arch = (getattr(getattr(base, "config", None), "architectures", None) or [type(base).__name__])[0]
    cls = type(base).__name__
    for name in (cls, arch):
        if name.endswith("ForCausalLM"):
            return "CAUSAL_LM"
        if name.endswith("ForSequenceClassification"):
            return "SEQ_CLS" if saves_modules else None
        if name.endswith("ForTokenClassification"):
            return "TOKEN_CLS" if saves_modules else None
    return "FEATURE_EXTRACTION" if cls.endswith("Model") else None


def read_delta_config(path: str | Path) -> DeltaConfig:
    """The delta's config from ``deltatune.json``, else from PEFT's ``adapter_config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise DeltaFileError(f"delta directory {str(path)!r} does not exist (expected a directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    own, peft = path / DELTATUNE_FILE, path / CONFIG_FILE
    if own.is_file():
        data = _read_json(own)
        return parse_delta_config(data.get("config", {}), where=str(own))
    if not peft.is_file():
        raise DeltaFileError(f"{path}: no {CONFIG_FILE} or {DELTATUNE_FILE}; this is not a delta directory")
    data = _read_json(peft)
    peft_type = data.get("peft_type")
    method = _peft_reader(peft_type, peft)
    try:
        return method.from_peft_config(data, str(peft))
    except DeltaFileError:
        raise
    except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise DeltaFileError(f"{peft}: invalid {peft_type} config ({one_line(err)})") from None


def _peft_reader(peft_type: Any, source: Path):
    """The method that reads PEFT files of ``peft_type``: its own ``peft_type``, or one it lists in
    ``peft_imports`` (LoRA reads AdaLoRA files, converting them in ``from_peft_tensors``)."""
    readable: set[str] = set()
    for method_name in list_methods():
        method = get_method(method_name)
        types = ((method.peft_type,) if method.peft_type else ()) + method.peft_imports
        if peft_type in types:
            return method
        readable.update(types)
    raise DeltaFileError(f"{source}: PEFT type {peft_type!r} is not supported; deltatune reads {sorted(readable)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaFileError(f"{path}: not valid JSON ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise DeltaFileError(f"{path}: expected a JSON object")
    return data


def read_delta_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``{logical key: tensor}`` from the delta's safetensors file (never a pickle). Files of a PEFT
    type that deltatune reads as another method's (AdaLoRA → LoRA) come back converted."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (found adapter_model.bin: pickle files are refused; re-save it as safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise DeltaFileError(f"{path}: missing {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {from_file_key(k): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaFileError(f"{weights}: not a readable safetensors file ({one_line(err)})") from None
    peft = path / CONFIG_FILE
    if not (path / DELTATUNE_FILE).is_file() and peft.is_file():  # PEFT's own file: maybe another format (AdaLoRA)
        data = _read_json(peft)
        tensors = _peft_reader(data.get("peft_type"), peft).from_peft_tensors(data, tensors, str(weights))
    return tensors


def converted_on_read(path: str | Path) -> bool:
    """True for a PEFT-only directory whose tensors the reading method converts (AdaLoRA read as
    LoRA, a LoRA with per-module alphas): readers must go through :func:`read_delta_tensors`."""
    path = Path(path)
    peft = path / CONFIG_FILE
    if (path / DELTATUNE_FILE).is_file() or not peft.is_file():
        return False
    data = _read_json(peft)
    return _peft_reader(data.get("peft_type"), peft).converts_peft_tensors(data)


def split_key(key: str, branch_keys: tuple[str, ...], full_copy_patterns: list[str], logical: set[str]) -> tuple[str, str]:
    """File key (prefix removed) → (logical module, branch-local key).

    ``model.layers.0.q_proj.lora_A.weight`` → (``model.layers.0.q_proj``, ``lora_A.weight``);
    ``classifier.weight`` with ``classifier`` in modules_to_save → (``classifier``, ``modules_to_save.weight``).
    """
    for bk in branch_keys:
        if key.endswith("." + bk):
            return key[: -len(bk) - 1], bk
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in logical and any(matches(p, module) for p in full_copy_patterns):
            return module, f"{FULL_COPY_KEY}." + ".".join(parts[cut:])
    raise DeltaFileError(
        f"tensor {PEFT_PREFIX + key!r} is neither a delta parameter (names ending in {', '.join(branch_keys)}) "
        f"nor a parameter of a module in modules_to_save {full_copy_patterns}"
    )


def load_delta_dir(model, path: str | Path, name: str) -> None:
    """Attach the delta stored at ``path`` to DeltaModel ``model`` as ``name`` and fill its weights.

    Every module name and tensor shape is checked first; on any mismatch the delta is removed
    again and a :class:`ShapeMismatchError` names the first offending key.
    """
    config = read_delta_config(path)
    tensors = read_delta_tensors(path)
    method = get_method(config.method)
    logical = {n for n, _ in iter_logical_modules(model.base_model)}
    modules: dict[str, None] = {}
    saved: dict[str, None] = {}
    by_internal_key: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in method.unprefixed_keys:  # the module is the method's (single, default) target
            by_internal_key[key] = tensor
            continue
        module, local = split_key(key, method.branch_keys_for(config), config.modules_to_save, logical)
        (saved if local.startswith(FULL_COPY_KEY + ".") else modules)[module] = None
        by_internal_key[f"{module}.{local}"] = tensor
    tensors = by_internal_key
    for module in list(modules) + list(saved):
        if module not in logical:
            near = closest(module, logical, 1)
            raise ShapeMismatchError(
                f"{path}: delta has weights for module {module!r}, which {type(model.base_model).__name__} does not have"
                + (f" (closest: {near[0]!r})" if near else "") + "; was it saved for another base model?"
            )
    exact = config.model_copy(update={"targets": list(modules) or None, "exclude": [], "modules_to_save": list(saved)})
    # attach() makes the new delta the active and trainable one; a failed load must not change either.
    previous_active = model.active
    previous_trainable = [p for p in model.parameters() if p.requires_grad]
    model.attach(exact, name=name)
    try:
        params = model.delta_state_dict(name)
        for key in params:  # unprefixed file keys → the attached module's internal key
            file_key = to_file_key(key, method.unprefixed_keys)
            if file_key in method.unprefixed_keys and file_key in tensors:
                tensors[key] = tensors.pop(file_key)
        for key, expected in params.items():
            if key not in tensors:
                raise ShapeMismatchError(f"{path}: tensor {to_file_key(key, method.unprefixed_keys, method.file_prefix)!r} is missing from {WEIGHTS_FILE}")
            found = tensors[key]
            if tuple(found.shape) != tuple(expected.shape):
                raise ShapeMismatchError(
                    f"{path}: tensor {to_file_key(key, method.unprefixed_keys, method.file_prefix)!r} has shape {list(found.shape)}, but the model needs "
                    f"{list(expected.shape)}; the delta was saved for another base model"
                )
        with torch.no_grad():
            for key, target in params.items():
                target.copy_(tensors[key].to(target.dtype))
    except BaseException:
        model.detach(name)
        model.set_active(previous_active)
        for p in previous_trainable:
            p.requires_grad_(True)
        raise
    # Keep the config as saved (the user's patterns, not the exact module list).
    model.delta_configs[name] = config
