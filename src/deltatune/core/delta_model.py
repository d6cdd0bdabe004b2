"""``DeltaModel``: a frozen base model plus named deltas.

A thin facade: it is called exactly like the base model (``model(input_ids=...)`` returns the
base model's output type) and forwards every other attribute (``generate``, ``config`` …) to
it. It owns the bookkeeping — which deltas exist, which are active, which are merged — while
:mod:`deltatune.core.inject` owns the module surgery.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.full_copy import FullCopyBranch
from deltatune.core.inject import get_logical, install_branch, iter_wrappers, remove_branch, unwrap
from deltatune.core.registry import get_method, parse_delta_config
from deltatune.core.targets import select_targets
from deltatune.utils.errors import ConfigError, DeltatuneError, did_you_mean

_OWNER_ATTR = "_deltatune_delta_model"


class DeltaModel(nn.Module):
    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.delta_configs: dict[str, DeltaConfig] = {}
        self.delta_targets: dict[str, list[str]] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        # Remember the facade on the base (outside nn.Module's registry, which must stay a tree)
        # so attach()/load_delta() on the same base add to it instead of nesting facades.
        base_model.__dict__[_OWNER_ATTR] = self

    @classmethod
    def of(cls, model: nn.Module) -> "DeltaModel":
        """The facade for ``model`` (itself if already one), created on first use."""
        if isinstance(model, DeltaModel):
            return model
        return model.__dict__.get(_OWNER_ATTR) or cls(model)

    # --- calling ---
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # --- deltas ---
    def attach(self, config: DeltaConfig | dict[str, Any], name: str = "default") -> "DeltaModel":
        """Add a delta named ``name``; it becomes the active and the trainable delta."""
        config = parse_delta_config(config)
        if name in self.delta_configs:
            raise ConfigError(f"a delta named {name!r} is already attached; detach it first or pick another name")
        if self._merged:
            raise DeltatuneError("deltas are merged into the base weights; unmerge() before attaching another")
        method = get_method(config.method)
        config = method.resolve_config(self.base_model, config)
        targets = select_targets(
            self.base_model,
            method.resolve_targets(self.base_model, config),
            config.exclude,
            method.can_wrap,
            method.target_kind,
        )
        saved = select_targets(self.base_model, config.modules_to_save, (), lambda m: True) if config.modules_to_save else []
        overlap = [t for t in targets for m in saved if t == m or t.startswith(m + ".") or m.startswith(t + ".")]
        if overlap and config.targets is None:
            # Method defaults (BitFit: every module with a bias) give way to modules trained in full.
            targets = [t for t in targets if t not in overlap]
            if not targets:
                raise ConfigError(f"method {config.method!r}: every default target is inside modules_to_save {list(config.modules_to_save)}; set targets")
        elif overlap:
            raise ConfigError(f"module {overlap[0]!r} is a target and also in (or contains) a module in modules_to_save")
        installed: list[str] = []
        try:
            for module_name in targets:
                branch = method.make_branch(module_name, unwrap(get_logical(self.base_model, module_name)), config)
                install_branch(self.base_model, module_name, name, branch)
                installed.append(module_name)
            for module_name in saved:
                install_branch(self.base_model, module_name, name, FullCopyBranch(unwrap(get_logical(self.base_model, module_name))))
                installed.append(module_name)
        except BaseException:
            for module_name in installed:
                remove_branch(self.base_model, module_name, name)
            raise
        self.delta_configs[name] = config
        self.delta_targets[name] = installed
        self.set_active([name])
        self.set_trainable([name])
        return self

    def detach(self, name: str) -> None:
        """Remove delta ``name``; with no delta left the base module tree is the original one."""
        self._check_name(name)
        if name in self._merged:
            raise DeltatuneError(f"delta {name!r} is merged; unmerge() before detaching it")
        for module_name in self.delta_targets.pop(name):
            remove_branch(self.base_model, module_name, name)
        del self.delta_configs[name]
        self._active = [a for a in self._active if a != name]

    def unload(self) -> nn.Module:
        """Detach every delta and return the restored base model."""
        for name in list(self.delta_configs):
            self.detach(name)
        self.base_model.__dict__.pop(_OWNER_ATTR, None)
        return self.base_model

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def set_active(self, names: list[str] | str) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check_name(n)
        if self._merged:
            raise DeltatuneError("cannot change the active deltas while deltas are merged; unmerge() first")
        self._active = names
        for _, wrapper in iter_wrappers(self.base_model):
            wrapper.active = [n for n in names if n in wrapper.deltas]

    def set_trainable(self, names: list[str] | str) -> None:
        """Exactly the parameters of deltas ``names`` require grad; the base and others are frozen."""
        names = [names] if isinstance(names, str) else list(names)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for _, wrapper in iter_wrappers(self.base_model):
            for n in names:
                if n in wrapper.deltas:
                    for p in wrapper.deltas[n].parameters():
                        p.requires_grad_(True)

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Run the plain base model inside the block (e.g. for a reference forward pass)."""
        if self._merged:
            raise DeltatuneError("cannot disable deltas that are merged into the weights; unmerge() first")
        wrappers = [w for _, w in iter_wrappers(self.base_model)]
        for w in wrappers:
            w.disabled = True
        try:
            yield
        finally:
            for w in wrappers:
                w.disabled = False

    # --- training hooks (generic: each method/branch decides what they do) ---
    def regularization_loss(self) -> torch.Tensor | None:
        """Sum of the active branches' ``regularization()`` terms, or None when no branch has one."""
        terms = [t for _, w in iter_wrappers(self.base_model) for n in w.active if n not in w.merged
                 for t in [w.deltas[n].regularization()] if t is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def on_train_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): let each active delta's method update its state."""
        for name in self._active:
            branches = {m: w.deltas[name] for m, w in iter_wrappers(self.base_model) if name in w.deltas}
            get_method(self.delta_configs[name].method).on_train_step(branches, self.delta_configs[name], step)

    def training_state(self) -> dict[str, dict[str, Any]]:
        """``{module: {delta: branch.training_state()}}``: what a trainer checkpoint keeps besides parameters."""
        return {m: {n: b.training_state() for n, b in w.deltas.items()} for m, w in iter_wrappers(self.base_model)}

    def load_training_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore :meth:`training_state` into the same deltas at the same modules."""
        wrappers = dict(iter_wrappers(self.base_model))
        have, saved = {(m, n) for m, w in wrappers.items() for n in w.deltas}, {(m, n) for m, s in state.items() for n in s}
        if have != saved:
            module, name = sorted(have ^ saved)[0]
            raise DeltatuneError(f"checkpoint training state does not match the model: delta {name!r} at {module!r} is in only one of them")
        for module, deltas in state.items():
            for name, branch_state in deltas.items():
                wrappers[module].deltas[name].load_training_state(branch_state)

    # --- merge ---
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold deltas (default: the active ones) into the base weights, in attach order.

        A delta folds into a module only if every active delta applied before it there is folded
        too (the forward applies branches in attach order, so anything else would change the
        output). ``safe=True`` first computes every merged weight on a copy and refuses NaN/inf.
        If merging fails part-way, the modules already merged for that delta are restored.
        """
        names = self.active if names is None else list(names)
        for name in names:
            self._check_name(name)
            method = get_method(self.delta_configs[name].method)
            if not method.capabilities.mergeable:
                raise DeltatuneError(f"delta {name!r} ({method.name}) cannot be merged into the weights")
            if name not in self._active:
                raise DeltatuneError(f"delta {name!r} is not active; only active deltas can be merged")
        for name in [n for n in self.delta_configs if n in names and n not in self._merged]:
            wrappers = [(m, w) for m, w in iter_wrappers(self.base_model) if name in w.deltas]
            for module_name, wrapper in wrappers:
                before = list(wrapper.deltas)[: list(wrapper.deltas).index(name)]
                blocking = [n for n in before if n in wrapper.active and n not in wrapper.merged]
                if blocking:
                    raise DeltatuneError(
                        f"cannot merge {name!r} into {module_name!r}: {blocking[0]!r} is applied before it there and is "
                        f"not merged; merge {blocking[0]!r} as well (merge([{blocking[0]!r}, {name!r}]))"
                    )
                if safe:
                    probe = copy.deepcopy(wrapper.base_layer)
                    wrapper.deltas[name].merge(probe)
                    if not all(torch.isfinite(p).all() for p in probe.parameters()):
                        raise DeltatuneError(f"merging delta {name!r} into {module_name!r} gives NaN/inf weights; nothing was merged")
            done = []
            try:
                for _, wrapper in wrappers:
                    wrapper.deltas[name].merge(wrapper.base_layer)
                    wrapper.merged.append(name)
                    done.append(wrapper)
            except BaseException:
                for wrapper in reversed(done):
                    wrapper.deltas[name].unmerge(wrapper.base_layer)
                    wrapper.merged.remove(name)
                raise
            self._merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last merged first (the exact inverse of :meth:`merge`)."""
        while self._merged:
            name = self._merged[-1]
            for _, wrapper in iter_wrappers(self.base_model):
                if name in wrapper.merged:
                    wrapper.deltas[name].unmerge(wrapper.base_layer)
                    wrapper.merged.remove(name)
            self._merged.pop()

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    # --- state ---
    def delta_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """``{"<logical module>.<branch key>": tensor}`` for one delta — the names files use."""
        name = self._default_name(name)
        state = {}
        for module_name, wrapper in iter_wrappers(self.base_model):
            if name in wrapper.deltas:
                for key, value in wrapper.deltas[name].saved_state().items():
                    state[f"{module_name}.{key}"] = value
        return state

    def delta_parameters(self, name: str | None = None) -> dict[str, nn.Parameter]:
        name = self._default_name(name)
        params = {}
        for module_name, wrapper in iter_wrappers(self.base_model):
            if name in wrapper.deltas:
                for key, p in wrapper.deltas[name].named_parameters():
                    params[f"{module_name}.{key}"] = p
        return params

    def save_delta(self, path: str, name: str | None = None) -> None:
        """Write delta ``name`` as a PEFT-compatible directory (see :mod:`deltatune.core.state`)."""
        from deltatune.core.state import save_delta_dir

        name = self._default_name(name)
        if name in self._merged:
            raise DeltatuneError(f"delta {name!r} is merged into the weights; unmerge() before saving it")
        save_delta_dir(self, name, path)

    def parameter_report(self) -> dict[str, Any]:
        """Trainable vs total parameters (base + deltas), overall and per delta."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        per_delta = {n: sum(p.numel() for p in self.delta_parameters(n).values()) for n in self.delta_configs}
        return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1), "per_delta": per_delta}

    def format_parameter_report(self) -> str:
        r = self.parameter_report()
        return f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || trainable%: {r['trainable_percent']:.4f}"

    # --- helpers ---
    def _check_name(self, name: str) -> None:
        if name not in self.delta_configs:
            raise ConfigError(f"no delta named {name!r}{did_you_mean(name, self.delta_configs)}; attached: {sorted(self.delta_configs)}")

    def _default_name(self, name: str | None) -> str:
        if name is not None:
            self._check_name(name)
            return name
        if len(self._active) == 1:
            return self._active[0]
        if len(self.delta_configs) == 1:
            return next(iter(self.delta_configs))
        raise ConfigError(f"several deltas attached ({sorted(self.delta_configs)}); name the one you mean")

