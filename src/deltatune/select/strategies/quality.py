"""Quality scoring: indicators per example, a linear rule, top-k.

("Instruction Mining: when data mining meets large language model fine-tuning", Cao et al.)
Indicators of item ``i``:

    length      words of the response (of the text for text / classification data)
    perplexity  exp(mean response-token NLL) under the scoring model  (loads the model only if weighted)
    ratio       response words / prompt words (instruction and chat data)
    reward      ``reward_fn(record) -> float``, a user scorer given as ``"module:function"``

Each indicator is standardised over the pool (``z = (v - mean) / std``, so weights are
unit-free) and combined as ``score_i = sum_k w_k z_ik``; the top ``budget`` scores are kept.
The weights can be fitted from a few small training runs with :func:`fit_linear_rule`
(least squares of the runs' eval losses on the mean indicators of their training sets; a
lower loss is better, so the rule to use is the negated fit).
"""
from __future__ import annotations

import importlib
import math

import torch
from pydantic import field_validator

from deltatune.select.registry import Selection, StrategyConfig, register_strategy
from deltatune.utils.errors import ConfigError, did_you_mean

INDICATORS = ("length", "perplexity", "ratio", "reward")


class QualityConfig(StrategyConfig):
    name: str = "quality"
    # Default: prefer what the base model finds natural (low perplexity). A default, not a fitted rule.
    weights: dict[str, float] = {"perplexity": -1.0}
    reward_fn: str | None = None  # "package.module:function", called with the record's dict
    standardize: bool = True

    @field_validator("weights")
    @classmethod
    def _known(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError(f"weights is empty; expected at least one of {', '.join(INDICATORS)}")
        for key in value:
            if key not in INDICATORS:
                raise ValueError(f"unknown indicator {key!r}{did_you_mean(key, INDICATORS)}; expected one of {', '.join(INDICATORS)}")
        return value


def load_reward_fn(spec: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"strategy.reward_fn {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy.reward_fn {spec!r}: cannot import ({err})") from None
    if not callable(fn):
        raise ConfigError(f"strategy.reward_fn {spec!r} is not callable")
    return fn


def fit_linear_rule(indicators: list[dict[str, float]], losses: list[float]) -> dict[str, float]:
    """Least-squares ``loss ≈ b + sum_k w_k v_k`` over training runs; returns ``{indicator: w_k, "bias": b}``.

    ``indicators[r]``: the mean (standardised) indicators of run ``r``'s training set;
    ``losses[r]``: that run's eval loss. Use ``{k: -w_k}`` as ``weights`` (lower loss = better).
    """
    if len(indicators) != len(losses) or not indicators:
        raise ValueError("need one indicator row per measured loss, and at least one run")
    keys = sorted(indicators[0])
    a = torch.tensor([[row[k] for k in keys] + [1.0] for row in indicators], dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64).unsqueeze(1)
    coef = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return {**dict(zip(keys, coef[:-1])), "bias": coef[-1]}


def _words(text: str) -> int:
    return len(text.split())


@register_strategy(QualityConfig)
def select_quality(ctx, config: QualityConfig) -> Selection:
    """Top-k by a linear rule over length, perplexity, response/instruction ratio and reward."""
    items = ctx.pool.items
    conversational = ctx.pool.format in ("instruction", "chat")
    if "ratio" in config.weights and not conversational:
        raise ConfigError(f"strategy.weights.ratio needs instruction or chat data; the pool {ctx.pool.path} is {ctx.pool.format!r}")
    if "reward" in config.weights and not config.reward_fn:
        raise ConfigError("strategy.weights.reward is set but strategy.reward_fn is not; expected 'module:function'")
    raw: dict[str, list[float]] = {}
    if "length" in config.weights:
        raw["length"] = [float(_words(it.response if conversational else it.text)) for it in items]
    if "ratio" in config.weights:
        raw["ratio"] = [_words(it.response) / max(1, _words(it.prompt)) for it in items]
    if "reward" in config.weights:
        fn = load_reward_fn(config.reward_fn)
        raw["reward"] = [float(fn(dict(it.data))) for it in items]
    if "perplexity" in config.weights:
        nll = ctx.scorer().mean_nll(ctx.pool, desc="quality: perplexity")
        raw["perplexity"] = [math.exp(min(nll[i], 50.0)) for i in range(len(items))]
    z = {}
    for key, values in raw.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = t.std(unbiased=False) if len(t) > 1 else torch.tensor(0.0, dtype=torch.float64)
        z[key] = ((t - t.mean()) / std if std > 0 else t - t.mean()) if config.standardize else t
    score = sum(config.weights[k] * z[k] for k in raw)
    order = sorted(range(len(items)), key=lambda i: (-float(score[i]), i))[: ctx.budget]
    scores = {i: {"score": float(score[i]), **{k: raw[k][i] for k in raw}} for i in order}
    rule = " + ".join(f"{w:g}*z({k})" for k, w in config.weights.items())
    return Selection(order, scores, reason=f"top-{ctx.budget} by the linear rule {rule}", summary={"weights": dict(config.weights)})
