"""GRAPE fit selection: per instruction, keep the response the base model finds most likely.

("The best instruction-tuning data are those that fit", 2025.) Candidates sharing the same
prompt (instruction + input, or the conversation before the last assistant turn) form one
group; each response gets its length-normalised log-likelihood under the scoring model,

    ll_i = (1/|R_i|) * sum_{t in R_i} log p(x_t | x_<t)      (see deltatune.select.score)

and the group keeps ``argmax ll_i``. With a budget, the groups whose kept response has the
highest ``ll`` are kept.
"""
from __future__ import annotations

from deltatune.select.registry import Selection, StrategyConfig, register_strategy


class GrapeConfig(StrategyConfig):
    name: str = "grape"


@register_strategy(GrapeConfig, needs_budget=False, formats=("instruction", "chat"))
def select_grape(ctx, config: GrapeConfig) -> Selection:
    """Per instruction, the response with the highest length-normalised log-likelihood."""
    groups: dict[str, list[int]] = {}
    for item in ctx.pool.items:
        groups.setdefault(item.prompt, []).append(item.index)
    nll = ctx.scorer().mean_nll(ctx.pool, desc="grape: score responses")
    kept, scores = [], {}
    for members in groups.values():
        ranked = sorted(members, key=lambda i: (nll[i], i))
        best = ranked[0]
        kept.append(best)
        scores[best] = {"log_likelihood": -nll[best], "candidates": float(len(members))}
        if len(ranked) > 1:
            scores[best]["runner_up_log_likelihood"] = -nll[ranked[1]]
    kept.sort(key=lambda i: (nll[i], i))
    if ctx.budget is not None:
        kept = kept[: ctx.budget]
    return Selection(kept, {i: scores[i] for i in kept},
                     reason="highest length-normalised log-likelihood among the responses to the same prompt",
                     summary={"groups": len(groups), "candidates": len(ctx.pool)})
