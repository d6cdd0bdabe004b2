"""Which modules a delta wraps.

A target pattern is one of
  * ``"all-linear"``      every ``nn.Linear`` except the model's output head(s);
  * ``"re:<regex>"``      a regular expression matched against the whole dotted module name;
  * a glob (``*?[``)      ``fnmatch`` against the whole dotted name, e.g. ``"model.layers.*.mlp.*"``;
  * a plain name          the whole dotted name, or its last components: ``"q_proj"`` matches
                          ``model.layers.0.self_attn.q_proj`` (PEFT's ``target_modules`` rule).
Names are *logical*: the names of the unwrapped model, so wrapping a module never changes
what a pattern selects.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from torch import nn

from deltatune.core.inject import iter_logical_modules, unwrap
from deltatune.utils.errors import TargetError, closest

ALL_LINEAR = "all-linear"
# Output heads are never "all-linear" targets: they map to the vocabulary / label space, and
# adapting them is a modules_to_save decision, not a low-rank one.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def head_module_names(model: nn.Module) -> set[str]:
    """Logical names of output heads (the LM head, a classifier …)."""
    names = {n for n, _ in iter_logical_modules(model) if n.split(".")[0] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names |= {n for n, m in iter_logical_modules(model) if m is unwrap(out)}
    return names


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def select_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: list[str] | tuple[str, ...] = (),
    can_wrap: Callable[[nn.Module], bool] = lambda m: isinstance(m, nn.Linear),
    kind: str = "nn.Linear",
) -> list[str]:
    """Logical names of the modules selected by ``targets`` minus ``exclude``, in model order.

    Raises :class:`TargetError` if a pattern matches nothing (naming the closest module names),
    if a pattern explicitly names a module of a type the method cannot wrap, or if the final
    selection is empty.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise TargetError("targets is empty: name at least one module pattern, or use 'all-linear'")
    modules = list(iter_logical_modules(model))
    by_name = dict(modules)
    heads = head_module_names(model)
    selected: dict[str, None] = {}
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [n for n, m in modules if isinstance(m, nn.Linear) and n not in heads and can_wrap(m)]
            if not hits:
                raise TargetError(f"target 'all-linear' found no {kind} modules outside the output head")
        else:
            _check_regex(pattern)
            hits = [n for n, _ in modules if matches(pattern, n)]
            if not hits:
                leaves = {n.rsplit(".", 1)[-1] for n, _ in modules}
                near = closest(pattern.removeprefix("re:"), sorted(leaves) + [n for n, _ in modules])
                hint = f"; closest module names: {', '.join(near)}" if near else ""
                raise TargetError(f"target {pattern!r} matches no module in {type(model).__name__}{hint}")
            wrappable = [n for n in hits if can_wrap(by_name[n])]
            if not wrappable:
                types = sorted({type(by_name[n]).__name__ for n in hits})
                raise TargetError(
                    f"target {pattern!r} matches {hits[0]!r} ({', '.join(types)}), but this method wraps {kind} modules only"
                )
            hits = wrappable
        selected.update(dict.fromkeys(hits))
    for pattern in exclude:
        _check_regex(pattern)
        for name in [n for n in selected if matches(pattern, n)]:
            del selected[name]
    if not selected:
        raise TargetError(f"targets {patterns} minus exclude {list(exclude)} leave no module to wrap")
    return [n for n, _ in modules if n in selected]


def compact_patterns(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest pattern list that selects exactly ``names``: leaf names if they suffice.

    Used when saving a PEFT ``target_modules`` list, which PEFT matches by name suffix.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = {n for n, _ in iter_logical_modules(model) if any(matches(leaf, n) for leaf in leaves)}
    return leaves if chosen == set(names) else list(names)


def _check_regex(pattern: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise TargetError(f"target {pattern!r} is not a valid regular expression: {err}") from None
