"""ComPEFT (Yadav et al., 2023): compress a delta by sparsifying and ternarising its parameters.

For every parameter tensor τ of a delta (LoRA's A and B, IA3's scales minus … — whatever the
delta's method stores), with n entries and density d::

    keep = top-⌊d·n⌋ entries of |τ|                  (at least one)
    τ̃    = scale · sign(τ) ⊙ keep,  scale = α · mean |τ[keep]|      (ternary)
    τ̃    = τ ⊙ keep                                                (ternary=False: exact kept values)

Storage per tensor (packed): ``keep`` as a bitmask [⌈n/8⌉ uint8] plus either ``signs`` [⌈k/8⌉ uint8]
and one fp32 ``scale`` (≈ 1.1 bits per entry at d = 0.1, vs 32), or the kept ``values`` [k].

The result is a delta of method ``compeft`` that wraps the original method: it loads with
``deltatune.load_delta`` (unpacking into the original method's branch) and merges like any other.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.method import Capabilities, DeltaBranch, DeltaMethod
from deltatune.core.registry import get_method, parse_delta_config, register
from deltatune.utils.errors import ConfigError

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] → uint8 [⌈n/8⌉], most significant bit first (as numpy.packbits)."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [⌈n/8⌉] → bool [n] (inverse of :func:`pack_bits`)."""
    return ((packed.reshape(-1, 1) >> _SHIFTS) & 1).reshape(-1)[:n].bool()


def compress_tensor(t: torch.Tensor, density: float, ternary: bool, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The packed form of ``t`` (see the module docstring)."""
    from deltatune.algebra.ops import magnitude_mask

    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    keep = magnitude_mask(t, density).reshape(-1)
    kept = t.reshape(-1)[keep].float()
    out = {"keep": pack_bits(keep)}
    if ternary:
        out["signs"] = pack_bits(kept >= 0)
        out["scale"] = torch.tensor([alpha * kept.abs().mean().item() if kept.numel() else 0.0])
    else:
        out["values"] = kept
    return out


def decompress_tensor(packed: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    keep = unpack_bits(packed["keep"], n)
    out = torch.zeros(n)
    if "values" in packed:
        out[keep] = packed["values"].float()
    else:
        k = int(keep.sum())
        signs = unpack_bits(packed["signs"], k).float() * 2 - 1
        out[keep] = signs * packed["scale"].float()
    return out.view(shape)


def _slot(key: str) -> str:
    return key.replace(".", "__")


class CompeftConfig(DeltaConfig):
    """``inner``: the compressed delta's own config; ``counts``: kept entries per ``<module>.<key>``
    (they fix the packed tensors' shapes; a key not listed keeps every entry); ``ternary``: signs ×
    scale instead of exact kept values. The defaults (a LoRA inner, everything kept, exact values)
    make a plain ``attach({"method": "compeft"})`` behave like the inner method."""

    method: Literal["compeft"] = "compeft"
    inner: dict[str, Any] = {"method": "lora"}
    density: float = Field(1.0, gt=0, le=1)
    ternary: bool = False
    counts: dict[str, int] = {}

    def inner_config(self) -> DeltaConfig:
        return parse_delta_config(self.inner, where="compeft.inner")


class PackedTensor(nn.Module):
    def __init__(self, numel: int, count: int, ternary: bool):
        super().__init__()
        keep = torch.zeros(numel, dtype=torch.bool) if count < numel else torch.ones(numel, dtype=torch.bool)
        self.register_buffer("keep", pack_bits(keep))
        if ternary:
            self.register_buffer("signs", torch.zeros(math.ceil(count / 8), dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(1))
        else:
            self.values = nn.Parameter(torch.zeros(count))


class CompeftBranch(DeltaBranch):
    """Holds the packed tensors; unpacks them into the wrapped method's branch when they change."""

    def __init__(self, inner: DeltaBranch, module_name: str, config: CompeftConfig):
        super().__init__()
        # Not a registered submodule: the inner branch's dense parameters are not saved or trained.
        self.__dict__["inner"] = inner
        self.transforms_input = inner.transforms_input
        self.wraps_call = inner.wraps_call
        # The tensors a file of the inner method holds (saved_state: a bundle's member keys, folded forms).
        self.shapes = {k: tuple(v.shape) for k, v in inner.saved_state().items()}
        self.packed = nn.ModuleDict({
            _slot(k): PackedTensor(math.prod(s), config.counts.get(f"{module_name}.{k}", math.prod(s)), config.ternary) for k, s in self.shapes.items()
        })
        self._unpacked_version = None

    def _sync(self) -> DeltaBranch:
        version = tuple(t._version for t in [*self.packed.buffers(), *self.packed.parameters()])
        if version != self._unpacked_version:
            targets = self.inner.saved_state()  # aliases of the inner branch's tensors, as the core loads files
            with torch.no_grad():
                for k, s in self.shapes.items():
                    targets[k].copy_(decompress_tensor(dict(self.packed[_slot(k)].state_dict()), s))
            self._unpacked_version = version
        return self.inner

    def transform_input(self, x):
        return self._sync().transform_input(x)

    def around_call(self, call, *args, **kwargs):
        return self._sync().around_call(call, *args, **kwargs)

    def forward(self, x, base_out):
        return self._sync()(x, base_out)

    def delta_weight(self, base):
        return self._sync().delta_weight(base)

    def merge(self, base):
        self._sync().merge(base)

    def unmerge(self, base):
        self._sync().unmerge(base)


@register
class CompeftMethod(DeltaMethod):
    name = "compeft"
    config_class = CompeftConfig
    capabilities = Capabilities(mergeable=True, linear_delta=False, unchanged_at_init=True)  # with a LoRA inner (the default)

    def __init__(self):
        self._inner: tuple[CompeftConfig, DeltaConfig] | None = None

    def resolve_config(self, model: nn.Module, config: CompeftConfig) -> CompeftConfig:
        # Always a new object: one attach = one config object = one inner config (see make_branch).
        return config.model_copy()

    def branch_keys_for(self, config: CompeftConfig) -> tuple[str, ...]:
        # The packed keys the inner method's keys produce ("packed.lora_A__weight.keep" …).
        inner = config.inner_config()
        return tuple(f"packed.{_slot(bk)}.{part}" for bk in get_method(inner.method).branch_keys_for(inner)
                     for part in ("keep", "signs", "scale", "values"))

    def resolve_targets(self, model, config: CompeftConfig):
        if config.targets is not None:
            return config.targets
        inner = config.inner_config()
        return get_method(inner.method).resolve_targets(model, inner)

    def can_wrap(self, module):
        return True

    def make_branch(self, module_name: str, module: nn.Module, config: CompeftConfig) -> CompeftBranch:
        # One inner config object per compeft config: an inner method that shares parameters across
        # its branches of one attach (compacter's PHM rules, keyed by config identity) shares them here too.
        if self._inner is None or self._inner[0] is not config:
            self._inner = (config, config.inner_config())
        inner = self._inner[1]
        branch = get_method(inner.method).make_branch(module_name, module, inner)
        return CompeftBranch(branch, module_name, config)


def compress_delta_tensors(config: DeltaConfig, tensors: dict[str, torch.Tensor], branch_keys: tuple[str, ...], density: float, ternary: bool,
                           alpha: float = 1.0) -> tuple[CompeftConfig, dict[str, torch.Tensor]]:
    """A delta's ``{<module>.<key>: tensor}`` → (compeft config, its packed ``{<module>.packed.<slot>.<part>: tensor}``).

    Tensors of ``modules_to_save`` (a trained head) are kept as they are: they are whole weights,
    not updates, and the core attaches them for any method.
    """
    from deltatune.core.targets import matches

    counts, packed, modules = {}, {}, set()
    for key, t in tensors.items():
        bk = next((b for b in branch_keys if key.endswith("." + b)), None)
        if bk is None:
            if any(matches(p, key.rsplit(".", 1)[0]) or key.startswith(p + ".") for p in config.modules_to_save):
                packed[key] = t
                continue
            raise ConfigError(f"compress: tensor {key!r} of the {config.method} delta is not stored per module (<module>.<{' | '.join(branch_keys)}>); "
                              "compress packs deltas on wrapped modules only")
        module = key[: -len(bk) - 1]
        modules.add(module)
        parts = compress_tensor(t, density, ternary, alpha)
        counts[key] = max(1, int(density * t.numel())) if density < 1 else t.numel()
        for part, value in parts.items():
            packed[f"{module}.packed.{_slot(bk)}.{part}"] = value
    modules = sorted(modules)
    inner = config.model_copy(update={"targets": modules, "exclude": [], "modules_to_save": []}).model_dump(mode="json")
    return CompeftConfig(inner=inner, density=density, ternary=ternary, counts=counts, targets=modules, modules_to_save=config.modules_to_save), packed


def compress_adapter(path, out, density: float, ternary: bool = True, alpha: float = 1.0) -> dict:
    """Compress the delta directory ``path`` into ``out`` (atomically); returns sizes and their ratio."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    import deltatune
    from deltatune.core.state import CONFIG_FILE, DELTATUNE_FILE, WEIGHTS_FILE, read_delta_config, read_delta_tensors, to_file_key
    from deltatune.utils.io import atomic_dir

    if not 0 < density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {density}")
    path, out = Path(path), Path(out)
    config = read_delta_config(path)
    if config.method == "compeft":
        raise ConfigError(f"{path} is already compressed (method compeft)")
    tensors = read_delta_tensors(path)
    method = get_method(config.method)
    new_config, packed = compress_delta_tensors(config, tensors, method.branch_keys_for(config), density, ternary, alpha)
    try:
        base_name = json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        base_name = None
    with atomic_dir(out) as tmp:
        save_file({to_file_key(k): v.contiguous() for k, v in packed.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps({"peft_type": None, "base_model_name_or_path": base_name}, indent=2) + "\n")
        own = {"deltatune_version": deltatune.__version__, "method": "compeft", "config": new_config.model_dump(mode="json"), "modules": new_config.targets}
        (tmp / DELTATUNE_FILE).write_text(json.dumps(own, indent=2) + "\n")
    before, after = (path / WEIGHTS_FILE).stat().st_size, (out / WEIGHTS_FILE).stat().st_size
    # Tensor bytes alone as well: on tiny deltas the safetensors header (tensor names) dominates the file.
    data_before = sum(t.numel() * t.element_size() for t in tensors.values())
    data_after = sum(t.numel() * t.element_size() for t in packed.values())
    return {"input": str(path), "output": str(out), "density": density, "ternary": ternary, "bytes_before": before, "bytes_after": after,
            "size_ratio": after / before, "tensor_bytes_ratio": data_after / data_before}
