"""Quality scoring: indicators per example, a linear rule, top-k.

("Instruction Mining: when data mining meets large language model fine-tuning", Cao et al.)
Indicators of item ``i``:

    length      words of the response (of the text for text / classification data)
    perplexity  exp(mean response-token NLL) under the scoring model  (loads the model only if weighted)
    ratio       response words / prompt words (instruction and chat data)
    reward      ``reward_fn(record) -> float``, a user scorer given as ``"module:function"``

Each indicator is standardised over the pool (``z = (v - mean) / std``, so weights are
unit-free) and combined as ``score_i = sum_k w_k z_ik``; the top ``budget`` scores are kept.

The weights can instead be fitted, as the paper does, from a few small training runs: ``fit``
lists each run's training file and the eval loss it reached. A run's row is the mean of its
records' standardised indicators (standardised with the *pool's* mean and std, so runs and
pool share one scale); least squares gives ``loss ≈ b + sum_k c_k z_k``
(:func:`fit_linear_rule`), and since a lower loss is better the rule used is ``w_k = -c_k``.
Whatever the runs were evaluated on is what the rule learns to prefer: evaluate them on a
sample of the target task to make the rule target-aware.
"""
from __future__ import annotations

import importlib
import json
import math

import torch
from pydantic import field_validator, model_validator

from deltatune.core.config import StrictConfig
from deltatune.select.pool import Pool, read_pool
from deltatune.select.registry import Selection, StrategyConfig, register_strategy
from deltatune.utils.errors import ConfigError, DataError, did_you_mean

INDICATORS = ("length", "perplexity", "ratio", "reward")


def _check_indicators(keys) -> None:
    if not keys:
        raise ValueError(f"no indicator given; expected at least one of {', '.join(INDICATORS)}")
    for key in keys:
        if key not in INDICATORS:
            raise ValueError(f"unknown indicator {key!r}{did_you_mean(key, INDICATORS)}; expected one of {', '.join(INDICATORS)}")


class FitRun(StrictConfig):
    data: str  # the run's training file (same format and columns as the pool)
    loss: float  # the eval loss it reached; lower is better

    @field_validator("loss")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"loss {value} is not a finite number")
        return value


class FitSection(StrictConfig):
    indicators: list[str]
    runs: list[FitRun]

    @model_validator(mode="after")
    def _enough_runs(self) -> "FitSection":
        _check_indicators(self.indicators)
        if len(set(self.indicators)) != len(self.indicators):
            raise ValueError(f"indicators {self.indicators} repeat a name")
        need = len(self.indicators) + 1  # one weight per indicator and the bias
        if len(self.runs) < need:
            raise ValueError(f"{len(self.runs)} runs cannot fit {len(self.indicators)} indicators and a bias; expected at least {need} runs")
        return self


# Without weights or fit: prefer what the base model finds natural (low perplexity). A default, not a fitted rule.
DEFAULT_WEIGHTS = {"perplexity": -1.0}


class QualityConfig(StrategyConfig):
    name: str = "quality"
    weights: dict[str, float] | None = None  # None: DEFAULT_WEIGHTS, unless fit is given
    fit: FitSection | None = None  # fit the weights from small training runs instead
    reward_fn: str | None = None  # "package.module:function", called with the record's dict
    standardize: bool = True

    @field_validator("weights")
    @classmethod
    def _known(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            _check_indicators(value)
        return value

    @model_validator(mode="after")
    def _weights_or_fit(self) -> "QualityConfig":
        if self.fit is not None and self.weights is not None:
            raise ValueError("give weights or fit, not both: fit computes the weights")
        return self

    @property
    def indicators(self) -> list[str]:
        return list(self.fit.indicators) if self.fit is not None else list(self.weights or DEFAULT_WEIGHTS)

    def input_paths(self) -> list[str]:
        return [run.data for run in self.fit.runs] if self.fit is not None else []


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


# Indicator rows closer to dependent than this (smallest / largest singular value) do not determine a rule.
MIN_SINGULAR_RATIO = 1e-6


def fit_linear_rule(indicators: list[dict[str, float]], losses: list[float]) -> dict[str, float]:
    """Least-squares ``loss ≈ b + sum_k w_k v_k`` over training runs; returns ``{indicator: w_k, "bias": b}``.

    ``indicators[r]``: the mean (standardised) indicators of run ``r``'s training set;
    ``losses[r]``: that run's eval loss. Use ``{k: -w_k}`` as ``weights`` (lower loss = better).
    """
    return fit_statistics(indicators, losses)["coefficients"]


def fit_statistics(indicators: list[dict[str, float]], losses: list[float]) -> dict:
    """The least-squares fit with what a reader needs to trust it: ``coefficients`` (and ``bias``),
    ``std_errors`` (classical OLS, ``None`` without residual degrees of freedom), ``r2`` (``None``
    when every loss is equal), ``condition_number`` of the design and ``predicted`` losses."""
    if len(indicators) != len(losses) or not indicators:
        raise ValueError("need one indicator row per measured loss, and at least one run")
    keys = sorted(indicators[0])
    a = torch.tensor([[row[k] for k in keys] + [1.0] for row in indicators], dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64)
    sv = torch.linalg.svdvals(a)
    rank = int((sv > MIN_SINGULAR_RATIO * sv[0]).sum()) if len(sv) else 0
    if rank < a.shape[1]:  # least squares would return one of infinitely many rules: refuse, do not guess
        raise ValueError(f"the runs' indicator rows (with the bias) have rank {rank}, below the {a.shape[1]} unknowns: "
                         f"the weights are not determined; add runs whose {', '.join(keys)} differ independently, or drop an indicator")
    coef = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.flatten()
    predicted = a @ coef
    rss = float(((y - predicted) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    dof = len(losses) - a.shape[1]
    std_errors = None
    if dof > 0:
        cov = rss / dof * torch.linalg.inv(a.T @ a)
        std_errors = dict(zip([*keys, "bias"], cov.diagonal().clamp_min(0).sqrt().tolist()))
    names = [*keys, "bias"]
    return {"coefficients": dict(zip(names, coef.tolist())), "std_errors": std_errors,
            "r2": 1.0 - rss / total if total > 0 else None, "condition_number": float(sv[0] / sv[-1]),
            "predicted": predicted.tolist()}


def _words(text: str) -> int:
    return len(text.split())


def _record_key(data: dict) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def raw_indicators(ctx, pool: Pool, keys: list[str], reward_fn, known_perplexity: dict[str, float] | None = None) -> dict[str, list[float]]:
    """``{indicator: [value per item of pool]}``. ``known_perplexity`` (record key → perplexity)
    spares rescoring records already scored (a fit run's records are usually pool records)."""
    items = pool.items
    conversational = pool.format in ("instruction", "chat")
    raw: dict[str, list[float]] = {}
    if "length" in keys:
        raw["length"] = [float(_words(it.response if conversational else it.text)) for it in items]
    if "ratio" in keys:
        raw["ratio"] = [_words(it.response) / max(1, _words(it.prompt)) for it in items]
    if "reward" in keys:
        raw["reward"] = [float(reward_fn(dict(it.data))) for it in items]
    if "perplexity" in keys:
        known = known_perplexity or {}
        record_keys = [_record_key(it.data) for it in items]
        missing = [i for i, key in enumerate(record_keys) if key not in known]
        nll = ctx.scorer().mean_nll(pool, missing, desc="quality: perplexity") if missing else {}
        raw["perplexity"] = [math.exp(min(nll[i], 50.0)) if i in nll else known[key] for i, key in enumerate(record_keys)]
    return {k: raw[k] for k in keys}


def _scaler(values: list[float], standardize: bool):
    """``v -> (v - mean) / std`` with the pool's mean and std (``std = 0``: centred only)."""
    if not standardize:
        return lambda t: t
    pool = torch.tensor(values, dtype=torch.float64)
    mean, std = pool.mean(), pool.std(unbiased=False) if len(pool) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (lambda t: (t - mean) / std) if std > 0 else (lambda t: t - mean)


def read_fit_runs(ctx, fit: FitSection) -> list[Pool]:
    """Each run's training file, read with the pool's reader options and checked (fields, format)."""
    run_pools = []
    for run in fit.runs:
        run_pool = read_pool(ctx.recipe.pool.model_copy(update={"path": run.data}), "fit run's training set")
        if run_pool.format != ctx.pool.format:
            raise DataError(f"{run_pool.items[0].origin}: the fit run's data is {run_pool.format!r} but the pool "
                            f"{ctx.pool.path} is {ctx.pool.format!r}; expected the same format")
        run_pools.append(run_pool)
    return run_pools


def fit_weights(ctx, config: QualityConfig, raw: dict[str, list[float]], scale: dict, run_pools: list[Pool], reward_fn) -> tuple[dict[str, float], dict]:
    """Weights ``-c_k`` of the least-squares fit of the runs' losses on their mean standardised
    indicators, and a summary of the fit (coefficients, R², each run's row and prediction)."""
    fit = config.fit
    known = None
    if "perplexity" in raw:
        known = {_record_key(it.data): raw["perplexity"][i] for i, it in enumerate(ctx.pool.items)}
    rows = []
    for run_pool in run_pools:
        run_raw = raw_indicators(ctx, run_pool, fit.indicators, reward_fn, known)
        rows.append({k: float(scale[k](torch.tensor(run_raw[k], dtype=torch.float64)).mean()) for k in fit.indicators})
    losses = [run.loss for run in fit.runs]
    try:
        stats = fit_statistics(rows, losses)
    except ValueError as err:
        raise ConfigError(f"strategy.fit ({', '.join(run.data for run in fit.runs)}): {err}") from None
    coef = stats["coefficients"]
    summary = {"coefficients": {k: coef[k] for k in fit.indicators}, "bias": coef["bias"], "std_errors": stats["std_errors"],
               "r2": stats["r2"], "condition_number": stats["condition_number"],
               "runs": [{"data": run.data, "records": len(p), "loss": run.loss, "predicted": pred, "indicators": row}
                        for run, p, pred, row in zip(fit.runs, run_pools, stats["predicted"], rows)]}
    return {k: -coef[k] for k in fit.indicators}, summary


@register_strategy(QualityConfig)
def select_quality(ctx, config: QualityConfig) -> Selection:
    """Top-k by a linear rule (given, or fitted from small runs) over length, perplexity, response/instruction ratio and reward."""
    keys = config.indicators
    conversational = ctx.pool.format in ("instruction", "chat")
    if "ratio" in keys and not conversational:
        raise ConfigError(f"strategy indicator ratio needs instruction or chat data; the pool {ctx.pool.path} is {ctx.pool.format!r}")
    if "reward" in keys and not config.reward_fn:
        raise ConfigError("strategy indicator reward is used but strategy.reward_fn is not set; expected 'module:function'")
    reward_fn = load_reward_fn(config.reward_fn) if "reward" in keys else None
    # The run files are read and checked before the pool is scored by any model.
    run_pools = read_fit_runs(ctx, config.fit) if config.fit is not None else []
    raw = raw_indicators(ctx, ctx.pool, keys, reward_fn)
    scale = {k: _scaler(raw[k], config.standardize) for k in keys}  # the pool's scale, shared by the fit runs
    summary: dict = {}
    weights = dict(config.weights or DEFAULT_WEIGHTS)
    if config.fit is not None:
        weights, summary["fit"] = fit_weights(ctx, config, raw, scale, run_pools, reward_fn)
    score = sum(weights[k] * scale[k](torch.tensor(raw[k], dtype=torch.float64)) for k in keys)
    order = sorted(range(len(ctx.pool)), key=lambda i: (-float(score[i]), i))[: ctx.budget]
    scores = {i: {"score": float(score[i]), **{k: raw[k][i] for k in keys}} for i in order}
    rule = " + ".join(f"{w:g}*z({k})" for k, w in weights.items())
    how = "given"
    if config.fit is not None:
        r2 = summary["fit"]["r2"]
        how = f"fitted on {len(config.fit.runs)} runs, R² " + ("n/a" if r2 is None else f"{r2:.3f}")
    return Selection(order, scores, reason=f"top-{ctx.budget} by the linear rule {rule} ({how})", summary={"weights": weights, **summary})
