"""Validated, frozen configs.

Every delta method has one ``DeltaConfig`` subclass; its ``method`` field is the registry key.
Configs are pydantic models (``extra="forbid"``, frozen), so a recipe typo fails at load time
with the key, its path and the closest valid key, instead of being silently ignored.
"""
from __future__ import annotations

from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict

from deltatune.utils.errors import ConfigError, did_you_mean

T = TypeVar("T", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base of all deltatune configs: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DeltaConfig(StrictConfig):
    """Fields every delta method shares.

    ``targets``: which modules to wrap — a name, a list of names/patterns, or ``"all-linear"``
    (see :mod:`deltatune.core.targets`). ``exclude``: patterns removed from that selection.
    ``modules_to_save``: modules trained in full and stored in the delta (e.g. a new
    classification head), as in PEFT.
    """

    method: str
    targets: str | list[str] | None = None
    exclude: list[str] = []
    modules_to_save: list[str] = []


def format_validation_error(err: pydantic.ValidationError, model_cls: type[BaseModel], where: str = "") -> str:
    """One line per problem: ``key path: what was found, what was expected (closest key)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        full = f"{where}.{loc}" if where and loc else (where or loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model_cls, e["loc"][:-1])
            lines.append(f"unknown key '{full}'{did_you_mean(str(e['loc'][-1]), valid)}; valid keys: {', '.join(sorted(valid))}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{full}'")
        else:
            lines.append(f"key '{full}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) config class at ``loc``, for "closest key" hints."""
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}).keys())


def validate_config(model_cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """``model_cls(**data)`` with pydantic errors turned into one readable :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or model_cls.__name__}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{model_cls.__name__}: {format_validation_error(err, model_cls, where)}") from None
