"""Selection strategies registered by name.

A strategy is a frozen config class (its ``name`` field is the registry key) and a function
``select(context, config) -> Selection``. What a strategy needs is data on the registration
(``needs_target``, ``needs_budget``, ``formats``), so the pipeline checks the recipe against it
before any model is loaded — no ``if strategy == …`` in the pipeline.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from deltatune.core.config import StrictConfig, format_validation_error
from deltatune.utils.errors import ConfigError, did_you_mean


class StrategyConfig(StrictConfig):
    name: str

    def input_paths(self) -> list[str]:
        """Files the strategy reads besides the pool and target (the pipeline refuses to write over them)."""
        return []


@dataclass
class Selection:
    """What a strategy returns: pool indices in the order chosen, and per kept index its scores.

    ``scores[i]`` is a dict of named numbers that explain why pool item ``i`` was kept
    (e.g. ``{"ot_gradient": -0.31}``); ``reason`` says in words how the scores were used.
    """

    indices: list[int]
    scores: dict[int, dict[str, float]]
    reason: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    name: str
    config_cls: type[StrategyConfig]
    select: Callable[..., Selection]
    # True/False, or (option, value): a target is needed exactly when that option has that value
    needs_target: bool | tuple[str, Any] = False
    needs_budget: bool = True
    formats: tuple[str, ...] | None = None  # pool formats it accepts; None = any
    doc: str = ""

    def uses_target(self, config: StrategyConfig) -> bool:
        if isinstance(self.needs_target, tuple):
            option, value = self.needs_target
            return getattr(config, option) == value
        return self.needs_target

    def describe(self, config: StrategyConfig) -> str:
        """``strategy 'x'``, plus the option that decides whether a target is used."""
        if isinstance(self.needs_target, tuple):
            option = self.needs_target[0]
            return f"strategy {self.name!r} with {option} {getattr(config, option)!r}"
        return f"strategy {self.name!r}"


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(config_cls: type[StrategyConfig], *, needs_target: bool | tuple[str, Any] = False, needs_budget: bool = True,
                      formats: tuple[str, ...] | None = None) -> Callable:
    """Decorator for ``select(context, config) -> Selection``; the key is ``config_cls``'s default ``name``."""
    name = config_cls.model_fields["name"].default

    def wrap(fn: Callable[..., Selection]) -> Callable[..., Selection]:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _STRATEGIES[name] = Strategy(name, config_cls, fn, needs_target, needs_budget, formats, doc)
        return fn

    return wrap


def list_strategies() -> list[str]:
    _load_builtin()
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    _load_builtin()
    if name not in _STRATEGIES:
        raise ConfigError(f"unknown selection strategy {name!r}{did_you_mean(name, _STRATEGIES)}; available: {', '.join(sorted(_STRATEGIES))}")
    return _STRATEGIES[name]


def parse_strategy_config(data: dict[str, Any]) -> StrategyConfig:
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"strategy: expected a mapping with a 'name' ({', '.join(list_strategies())}), got {data!r}")
    strategy = get_strategy(str(data["name"]))
    try:
        return strategy.config_cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, strategy.config_cls, "strategy")) from None


def _load_builtin() -> None:
    import deltatune.select.strategies  # noqa: F401  (registers the built-in strategies)
