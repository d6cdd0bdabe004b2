"""PEFT AdaLoRA files → plain LoRA with per-module ranks (Zhang et al., 2023).

AdaLoRA parametrises the update of a linear layer as an SVD-like triplet and prunes singular
values during training. PEFT (``peft/tuners/adalora/layer.py``, ``SVDLinear``) computes::

    y = x Wᵀ + (x (A ⊙ E)ᵀ Bᵀ) · c / (ranknum + 1e-5)
        A [r_m, in], E [r_m, 1], B [out, r_m],  c = lora_alpha (or r_m when lora_alpha <= 0)

``ranknum`` is ``init_r`` for every module (PEFT keeps it when it shrinks a module to the rank
it saved in ``rank_pattern``: ``{"<module>.lora_E": [keep?] * init_r}``), and the file holds
only the kept triplets, so module ``m`` has rank ``r_m = sum(mask)``, possibly 0.

The same function as LoRA with rank ``r_m`` and scale ``s = alpha / init_r``::

    A' = A ⊙ E                               [r_m, in]
    B' = B · (c / (init_r + 1e-5)) / s       [out, r_m]      so  s · B' A' = c / (ranknum + 1e-5) · B (A ⊙ E)

Modules pruned to rank 0 add nothing and are left out (``exclude``); the other ranks go into
:class:`~deltatune.methods.lora.LoraConfig`'s ``rank_pattern``. Saving the loaded delta writes
plain PEFT LoRA files.
"""
from __future__ import annotations

from typing import Any

import torch

from deltatune.methods.lora import LoraConfig
from deltatune.utils.errors import DeltaFileError, ShapeMismatchError

PARTS = ("lora_A", "lora_B", "lora_E")


def _masks(peft_config: dict[str, Any], source: str) -> dict[str, list[bool]]:
    """PEFT's saved ``rank_pattern`` as ``{module: [keep?] * init_r}`` (None: nothing pruned yet)."""
    pattern = peft_config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise DeltaFileError(f"{source}: AdaLoRA rank_pattern must be a mapping of '<module>.lora_E' to lists of booleans, got {type(pattern).__name__}")
    masks = {}
    for key, mask in pattern.items():
        module = key.rsplit(".lora_E", 1)[0] if ".lora_E" in key else key
        if not isinstance(mask, list) or not all(isinstance(v, (bool, int)) for v in mask):
            raise DeltaFileError(f"{source}: AdaLoRA rank_pattern[{key!r}] must be a list of booleans, got {mask!r}")
        masks[module] = [bool(v) for v in mask]
    return masks


def _ranks(peft_config: dict[str, Any], source: str) -> tuple[int, dict[str, int]]:
    init_r = peft_config.get("init_r", 12)
    if not isinstance(init_r, int) or init_r <= 0:
        raise DeltaFileError(f"{source}: AdaLoRA init_r must be a positive integer, got {init_r!r}")
    return init_r, {module: sum(mask) for module, mask in _masks(peft_config, source).items()}


def _alpha(peft_config: dict[str, Any], init_r: int) -> float:
    alpha = float(peft_config.get("lora_alpha", 8))
    return alpha if alpha > 0 else float(init_r)


def adalora_lora_config(peft_config: dict[str, Any], source: str) -> LoraConfig:
    """The LoRA config of an AdaLoRA ``adapter_config.json``: ``r = init_r``, ``rank_pattern`` the
    modules whose rank differs, rank-0 modules excluded."""
    unsupported = {"fan_in_fan_out": (False, None), "bias": ("none", None), "layers_to_transform": (None, []), "use_dora": (False, None)}
    for key, allowed in unsupported.items():
        if key in peft_config and peft_config[key] not in allowed:
            raise DeltaFileError(f"{source}: PEFT AdaLoRA option {key}={peft_config[key]!r} is not supported by deltatune")
    init_r, ranks = _ranks(peft_config, source)
    targets = peft_config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = "re:" + targets
    exclude = peft_config.get("exclude_modules") or []
    if isinstance(exclude, str):
        exclude = ["re:" + exclude]
    return LoraConfig(
        r=init_r,
        alpha=_alpha(peft_config, init_r),
        dropout=float(peft_config.get("lora_dropout", 0.0) or 0.0),
        targets=targets,
        exclude=list(exclude) + [m for m, r in ranks.items() if r == 0],
        rank_pattern={m: r for m, r in ranks.items() if r not in (0, init_r)},
        modules_to_save=list(peft_config.get("modules_to_save") or []),
    )


@torch.no_grad()
def adalora_lora_tensors(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """AdaLoRA's ``<module>.lora_A/B/E`` → ``<module>.lora_A.weight``, ``<module>.lora_B.weight``
    with E and the scale folded in (see the module docstring); other keys pass through."""
    init_r, _ = _ranks(peft_config, source)
    masks = _masks(peft_config, source)
    alpha = float(peft_config.get("lora_alpha", 8))
    lora_scale = _alpha(peft_config, init_r) / init_r
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, _, part = key.rpartition(".")
        if part in PARTS:
            by_module.setdefault(module, {})[part] = tensor
        else:
            out[key] = tensor
    for module, parts in by_module.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ShapeMismatchError(f"{source}: AdaLoRA module {module!r} has no {missing[0]} tensor (it needs lora_A, lora_B and lora_E)")
        a, b, e = parts["lora_A"], parts["lora_B"], parts["lora_E"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or tuple(e.shape) != (rank, 1) or b.shape[1] != rank:
            raise ShapeMismatchError(
                f"{source}: AdaLoRA module {module!r} has lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)}; "
                f"expected [r, in], [r, 1], [out, r] with one r"
            )
        mask = masks.get(module)
        if mask is not None and rank == len(mask) != sum(mask):  # not shrunk yet: keep what rank_pattern keeps (as PEFT's save does)
            keep = torch.tensor(mask)
            a, e, b = a[keep], e[keep], b[:, keep]
            rank = sum(mask)
        expected = sum(mask) if mask is not None else init_r
        if rank != expected:
            raise ShapeMismatchError(
                f"{source}: AdaLoRA module {module!r} has rank {rank} (lora_A {list(a.shape)}), but "
                + (f"rank_pattern keeps {expected} of {len(mask)}" if mask is not None else f"init_r is {init_r} and rank_pattern does not name it")
            )
        if rank == 0:
            continue
        adalora_scale = (alpha if alpha > 0 else rank) / (init_r + 1e-5)
        out[f"{module}.lora_A.weight"] = a * e
        out[f"{module}.lora_B.weight"] = b * (adalora_scale / lora_scale)
    if not any(k.endswith(".lora_A.weight") for k in out):
        raise DeltaFileError(f"{source}: every AdaLoRA module was pruned to rank 0 (or the file has none); the adapter changes nothing")
    return out
