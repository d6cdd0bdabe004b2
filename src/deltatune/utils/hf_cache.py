"""The one place that knows what transformers calls the KV-cache argument.

transformers 5.25 renamed the ``past_key_values`` argument of every model and layer ``forward``
(and the output field of the same name) to ``cache``. The old name is still accepted, with a
deprecation warning, until 5.40; before 5.25 only the old name exists. Code that builds or edits a
call therefore asks the callee which name it takes, and code that reads a call or an output accepts
either name. Nothing else in deltatune spells either name.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

NEW_NAME = "cache"
OLD_NAME = "past_key_values"
CACHE_NAMES = (NEW_NAME, OLD_NAME)


def cache_arg_name(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache (``cache`` first), or None.

    A facade whose forward only passes ``**kwargs`` on to its ``base_model`` (deltatune's
    DeltaModel) takes whatever the wrapped model takes.
    """
    params = inspect.signature(module.forward).parameters
    name = next((name for name in CACHE_NAMES if name in params), None)
    inner = getattr(module, "base_model", None)
    if name is None and isinstance(inner, nn.Module) and inner is not module:
        return cache_arg_name(inner)
    return name


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments, under whichever name it came; None if absent.

    Passing both names is refused, as transformers itself does: the two could disagree.
    """
    found = {name: kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None}
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    if len(found) > 1:
        raise TypeError(f"a call passed both {NEW_NAME!r} and {OLD_NAME!r}; pass the cache once")
    return next(iter(found.values()), None)


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a call's keyword arguments under either name, without removing it."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model returned (``output.cache`` from 5.25, ``output.past_key_values`` before)."""
    for name in CACHE_NAMES:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None
