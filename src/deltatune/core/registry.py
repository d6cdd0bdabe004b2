"""Method registry: name → :class:`DeltaMethod`. Methods register themselves at import."""
from __future__ import annotations

from typing import Any

from deltatune.core.config import DeltaConfig, validate_config
from deltatune.core.method import DeltaMethod
from deltatune.utils.errors import ConfigError, did_you_mean

_METHODS: dict[str, DeltaMethod] = {}


def register(method_cls: type[DeltaMethod]) -> type[DeltaMethod]:
    """Class decorator: ``@register class LoraMethod(DeltaMethod): name = "lora" …``."""
    if method_cls.name in _METHODS:
        raise ValueError(f"delta method {method_cls.name!r} registered twice")
    _METHODS[method_cls.name] = method_cls()
    return method_cls


def _ensure_builtin_methods() -> None:
    import deltatune.methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    _ensure_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> DeltaMethod:
    _ensure_builtin_methods()
    if name not in _METHODS:
        raise ConfigError(f"unknown delta method {name!r}{did_you_mean(name, _METHODS)}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def parse_delta_config(config: DeltaConfig | dict[str, Any], where: str = "delta") -> DeltaConfig:
    """A config object as is, or a plain dict (as in a recipe) validated by its method's class."""
    if isinstance(config, DeltaConfig):
        get_method(config.method)
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a delta config or a mapping with a 'method' key, got {type(config).__name__}")
    if "method" not in config:
        raise ConfigError(f"{where}: missing required key 'method' (one of: {', '.join(list_methods())})")
    method = get_method(config["method"])
    return validate_config(method.config_class, config, where)
