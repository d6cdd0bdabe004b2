"""The only code that swaps modules in a model.

``DeltaWrapper`` takes the place of a targeted module and keeps it as ``base_layer``; named
delta branches sit beside it. Removing the last branch puts the original module back, so the
module tree and state-dict key names are exactly those of the untouched model.
"""
from __future__ import annotations

import functools

from torch import nn

from deltatune.core.method import DeltaBranch


class DeltaWrapper(nn.Module):
    """output = branches applied in attach order to ``base_layer(x)``.

    ``active`` names the branches that run; ``merged`` is the stack of branches currently
    folded into ``base_layer``'s weights (their forward is skipped to avoid counting twice).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        running = [self.deltas[n] for n in self.active if n not in self.merged]
        if not any(b.wraps_call for b in running):
            return self._run(running, *args, **kwargs)
        # Call-wrapping branches (prefix/prompt tuning) run around everything else, first attached outermost.
        call = functools.partial(self._run, running)
        for branch in reversed(running):
            if branch.wraps_call:
                call = functools.partial(branch.around_call, call)
        return call(*args, **kwargs)

    def _run(self, running: list[DeltaBranch], *args, **kwargs):
        # The module's main input: its first positional argument, or — for blocks that model code
        # calls by keyword, like attention(hidden_states=..., ...) — its first keyword argument.
        key = None if args else next(iter(kwargs))
        x = args[0] if args else kwargs[key]
        base_in = x
        for branch in running:
            if branch.transforms_input:
                base_in = branch.transform_input(base_in)
        if args:
            out = self.base_layer(base_in, *args[1:], **kwargs)
        else:
            out = self.base_layer(**{**kwargs, key: base_in})
        for branch in running:
            out = branch(x, out)
        return out

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of the module it calls (e.g. `.weight`,
        # `.in_features`); forward those to the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)


def unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, DeltaWrapper) else module


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds logical ``name`` and the attribute under which it is held."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model
    for part in parent_name.split(".") if parent_name else []:
        parent = unwrap(getattr(parent, part))
    return parent, leaf


def get_logical(model: nn.Module, name: str) -> nn.Module:
    """The module at logical ``name`` (a wrapper if one is installed there)."""
    parent, leaf = _parent(model, name)
    return getattr(parent, leaf)


def install_branch(model: nn.Module, name: str, delta_name: str, branch: DeltaBranch) -> DeltaWrapper:
    """Wrap the module at logical ``name`` (once) and add ``branch`` under ``delta_name``."""
    parent, leaf = _parent(model, name)
    current = getattr(parent, leaf)
    if not isinstance(current, DeltaWrapper):
        wrapper = DeltaWrapper(current)
        setattr(parent, leaf, wrapper)
        current = wrapper
    if delta_name in current.deltas:
        raise ValueError(f"module {name!r} already has a delta named {delta_name!r}")
    ref = current.base_layer.weight if hasattr(current.base_layer, "weight") else None
    if ref is not None:
        branch.to(device=ref.device)
    # A new nn.Module is in training mode; follow the model's mode (LoRA dropout must stay off in an eval model).
    branch.train(current.base_layer.training)
    current.deltas[delta_name] = branch
    return current


def remove_branch(model: nn.Module, name: str, delta_name: str) -> None:
    """Remove a branch; when none is left, restore the original module in place."""
    parent, leaf = _parent(model, name)
    wrapper = getattr(parent, leaf)
    if not isinstance(wrapper, DeltaWrapper) or delta_name not in wrapper.deltas:
        return
    if delta_name in wrapper.merged:
        raise ValueError(f"delta {delta_name!r} is merged into {name!r}; unmerge it before removing it")
    del wrapper.deltas[delta_name]
    wrapper.active = [a for a in wrapper.active if a != delta_name]
    if len(wrapper.deltas) == 0:
        setattr(parent, leaf, wrapper.base_layer)


def _walk(prefix: str, module: nn.Module):
    """``(logical_name, held_module)`` depth first; a wrapper is followed into its base layer."""
    if prefix:
        yield prefix, module
    if isinstance(module, DeltaWrapper):
        module = module.base_layer
    for child_name, child in module.named_children():
        yield from _walk(f"{prefix}.{child_name}" if prefix else child_name, child)


def iter_logical_modules(model: nn.Module):
    """``(name, module)`` as if no wrapper were installed (a wrapper yields its base layer)."""
    for name, module in _walk("", model):
        yield name, unwrap(module)


def iter_wrappers(model: nn.Module):
    """``(logical_name, wrapper)`` for every installed wrapper."""
    for name, module in _walk("", model):
        if isinstance(module, DeltaWrapper):
            yield name, module
