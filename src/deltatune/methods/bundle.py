"""Mix-and-match: several deltas attached, trained and saved together as one delta (a bundle).

    {"method": "bundle", "deltas": {"prefix": {"method": "prefix_tuning"},
                                    "adapter": {"method": "bottleneck", "placement": "parallel"}}}

is He et al.'s MAM adapter (the default bundle): prefix tuning on attention plus a parallel
bottleneck adapter on the FFN. Each member is an ordinary method config, resolved against the
model as if attached alone; its targets are stored as exact module names. A module targeted by
several members gets one :class:`BundleBranch` that applies theirs in the listed order. The
bundle-level ``targets`` / ``exclude`` only *restrict* where members apply.

Files: keys ``<module>.<member>.<member's key>`` (e.g. ``model.layers.0.mlp.adapter.adapter_up.weight``),
``deltatune.json`` holds every member's (saved) config. PEFT has no bundles, so there is no PEFT
config. A bundle is not merged into the weights (``merge()`` refuses it).
"""
from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from pydantic import SerializeAsAny, field_validator
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import get_method, parse_delta_config, register
from deltatune.core.targets import select_targets
from deltatune.utils.errors import ConfigError

MAM = {"prefix": {"method": "prefix_tuning"}, "adapter": {"method": "bottleneck", "placement": "parallel", "scaling": 4.0}}


class BundleConfig(DeltaConfig):
    """``deltas``: member name → method config (default: the MAM adapter). Member names are plain
    identifiers; members may not be bundles or have their own ``modules_to_save`` (put those on the bundle)."""

    method: Literal["bundle"] = "bundle"
    deltas: dict[str, SerializeAsAny[DeltaConfig]] = MAM

    @field_validator("deltas", mode="before")
    @classmethod
    def _parse_members(cls, value: Any) -> dict[str, DeltaConfig]:
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a non-empty mapping of member name → delta config")
        members = {}
        for key, sub in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"member name {key!r} must be a plain identifier (it becomes part of saved keys)")
            try:
                config = parse_delta_config(sub, where=f"deltas.{key}")
            except ConfigError as err:
                raise ValueError(str(err)) from None
            if config.method == "bundle":
                raise ValueError(f"member {key!r} is itself a bundle; list its members directly")
            if config.modules_to_save:
                raise ValueError(f"member {key!r} sets modules_to_save; set it on the bundle instead")
            members[key] = config
        return members


class BundleBranch(DeltaBranch):
    """The members' branches at one module, applied in order (call-wrappers outermost, first member first)."""

    def __init__(self, members: dict[str, DeltaBranch]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.transforms_input = any(b.transforms_input for b in members.values())
        self.wraps_call = any(b.wraps_call for b in members.values())

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.members.values():
            if b.transforms_input:
                x = b.transform_input(x)
        return x

    def forward(self, x, base_out):
        for b in self.members.values():
            base_out = b(x, base_out)
        return base_out

    def around_call(self, call, *args, **kwargs):
        for b in reversed(list(self.members.values())):
            if b.wraps_call:
                call = functools.partial(b.around_call, call)
        return call(*args, **kwargs)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, b in self.members.items() for k, v in b.saved_state().items()}

    def training_state(self):
        return {name: b.training_state() for name, b in self.members.items()}

    def load_training_state(self, state):
        for name, b in self.members.items():
            b.load_training_state(state[name])


@register
class BundleMethod(DeltaMethod):
    name = "bundle"
    config_class = BundleConfig
    # The default bundle (MAM) holds a prefix, which changes outputs at attach; bundles never merge.
    capabilities = Capabilities(mergeable=False, unchanged_at_init=False)
    target_kind = "modules its members can wrap"

    def resolve_config(self, model: nn.Module, config: BundleConfig) -> BundleConfig:
        """Each member resolved as if attached alone, with its targets as exact module names."""
        allowed = None
        if config.targets is not None or config.exclude:
            allowed = set(select_targets(model, config.targets if config.targets is not None else "re:.*", config.exclude, lambda m: True))
        members = {}
        for key, sub in config.deltas.items():
            method = get_method(sub.method)
            sub = method.resolve_config(model, sub)
            names = select_targets(model, method.resolve_targets(model, sub), sub.exclude, method.can_wrap, method.target_kind)
            if allowed is not None:
                names = [n for n in names if n in allowed]
                if not names:
                    raise ConfigError(f"bundle member {key!r}: the bundle's targets/exclude leave it no module")
            members[key] = sub.model_copy(update={"targets": names, "exclude": []})
        return config.model_copy(update={"deltas": members})

    def resolve_targets(self, model: nn.Module, config: BundleConfig) -> list[str]:
        return list(dict.fromkeys(n for sub in config.deltas.values() for n in sub.targets))

    def can_wrap(self, module: nn.Module) -> bool:
        return True  # the members' own can_wrap already chose their modules

    def make_branch(self, module_name: str, module: nn.Module, config: BundleConfig) -> BundleBranch:
        members = {
            key: get_method(sub.method).make_branch(module_name, module, sub)
            for key, sub in config.deltas.items()
            if module_name in sub.targets
        }
        return BundleBranch(members)

    def saved_config(self, config: BundleConfig) -> BundleConfig:
        return config.model_copy(update={"deltas": {k: get_method(s.method).saved_config(s) for k, s in config.deltas.items()}})

    def branch_keys_for(self, config: BundleConfig) -> tuple[str, ...]:
        return tuple(f"{key}.{k}" for key, sub in config.deltas.items() for k in get_method(sub.method).branch_keys_for(sub))
