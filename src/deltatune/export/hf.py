"""Merged model → a plain Hugging Face directory.

The merge itself is the core's: :meth:`DeltaModel.merge` folds the active deltas into the
wrapped modules' weights, the state dict is read under the *logical* (unwrapped) names, and the
deltas are unmerged again, so the caller's model is left as it was (up to fp rounding of
``W + ΔW − ΔW``). No method-specific code: whatever merges in the core exports here.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from deltatune.core.delta_model import DeltaModel
from deltatune.core.inject import iter_wrappers
from deltatune.utils.errors import ConfigError, DeltatuneError, one_line
from deltatune.utils.io import atomic_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Wrapper-internal key segments: ``x.base_layer.weight`` is the logical ``x.weight``; ``x.deltas.*`` are delta parameters.
_BASE_LAYER = re.compile(r"(^|\.)base_layer\.")
_DELTAS = re.compile(r"(^|\.)deltas\.")


def base_of(model: nn.Module) -> nn.Module:
    """The ``transformers`` model under a DeltaModel facade (or ``model`` itself)."""
    return model.base_model if isinstance(model, DeltaModel) else model


def _facade(model: nn.Module) -> DeltaModel | None:
    if isinstance(model, DeltaModel):
        return model
    return model.__dict__.get("_deltatune_delta_model")


def _check_untied(base: nn.Module, facade: DeltaModel) -> None:
    """Refuse deltas on a module whose weight is shared with another module (tied embeddings).

    At run time a LoRA on a tied ``lm_head`` changes only the head's output; merged, the shared
    tensor would change the input embeddings too, so the exported model would compute something else.
    """
    owners: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(name)
    # Parameter names are physical (``…mlp.base_layer.up_proj.weight``), wrapper names logical: compare
    # with the wrapper's physical path, which differs from its logical name when wrappers nest (a bundle).
    physical = {id(m): n for n, m in base.named_modules(remove_duplicate=False)}
    for module_name, wrapper in iter_wrappers(base):
        if not any(n in wrapper.active and n not in wrapper.merged for n in wrapper.deltas):
            continue
        inside = physical[id(wrapper)] + "."
        for p in wrapper.base_layer.parameters():
            shared = [n for n in owners.get(p.data_ptr(), []) if not n.startswith(inside)]
            if shared:
                raise DeltatuneError(
                    f"module {module_name!r} carries an active delta but its weight is tied to {shared[0]!r}; "
                    "merging would change both — untie the weights (tie_word_embeddings=False) before training such a delta"
                )


def logical_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """``base.state_dict()`` under the unwrapped names, without delta parameters."""
    out = {}
    for key, value in base.state_dict().items():
        if _DELTAS.search(key):
            continue
        out[_BASE_LAYER.sub(r"\1", key)] = value
    return out


@contextlib.contextmanager
def merged_state_dict(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the logical state dict with every active delta merged in; unmerge on exit.

    The tensors alias the live weights: copy what you need inside the block. A delta that
    cannot be merged (e.g. a bottleneck adapter) raises the core's clear error before anything changes.
    """
    base = base_of(model)
    facade = _facade(model)
    merged_here = False
    if facade is not None and facade.active and not facade.merged:
        _check_untied(base, facade)
        facade.merge(safe=True)
        merged_here = True
    try:
        state = logical_state_dict(base)
        _check_keys(base, state)
        yield state
    finally:
        if merged_here:
            facade.unmerge()


def _check_keys(base: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The keys must be exactly those of a fresh model of the same class (built on the meta device)."""
    config = getattr(base, "config", None)
    if config is None:
        return
    with torch.device("meta"):
        fresh = type(base)(config)
    expected = set(fresh.state_dict())
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise DeltatuneError(f"merged state dict does not match {type(base).__name__}: unexpected keys {extra[:3]}, missing keys {missing[:3]}")


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: str = "float32") -> Path:
    """Write ``model`` with its active deltas merged as a HF directory (atomically).

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (or shards), ``generation_config.json``
    where the model has one, and the tokenizer's files when ``tokenizer`` is given.
    ``AutoModel*.from_pretrained(out_dir)`` then computes the same outputs as base + deltas.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    base = base_of(model)
    if not hasattr(base, "save_pretrained"):
        raise ConfigError(f"cannot export {type(base).__name__} as a HF directory: it is not a transformers model (no save_pretrained)")
    out_dir = Path(out_dir)
    torch_dtype = DTYPES[dtype]
    with merged_state_dict(model) as state, atomic_dir(out_dir) as tmp:
        state = {k: v.detach().to("cpu", torch_dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
        # The saved config says which dtype the weights are in; don't leave the caller's config changed.
        previous = getattr(base.config, "dtype", None)
        base.config.dtype = torch_dtype
        try:
            base.save_pretrained(str(tmp), state_dict=state)
        except Exception as err:
            raise DeltatuneError(f"{out_dir}: writing the merged model failed: {one_line(err)}") from None
        finally:
            base.config.dtype = previous
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
