"""LoRA-aware merging: K low-rank deltas → one LoRA adapter, one module at a time.

Each input's method gives its exact factors ΔW_k = B_k A_k (``low_rank_factors()``: B_k [out, r_k]
with the scale folded in, A_k [r_k, in]; PiSSA gives rank 2r, ``[s·B, −s·B₀] [A; A₀]``), so no
tensor of a file is read here. With the op's coefficients c_k (task arithmetic: λ·w_k; linear:
λ·w_k / Σ w):

- ``concat`` (exact, for weighted sums only)::

      Σ_k c_k ΔW_k = [c_1 B_1 | … | c_K B_K] · [A_1; …; A_K]     rank Σ r_k, scaling 1

- ``svd`` (any op, e.g. TIES): ΔW = op(ΔW_1 … ΔW_K) for one module, then its best rank-r
  approximation U_r S_r V_rᵀ (Eckart–Young): B = U_r S_r, A = V_rᵀ, scaling 1.

Only one module's dense ΔW_k exist at any time. The output is an ordinary LoRA directory (PEFT's
files), so it loads with ``deltatune.load_delta`` and with PEFT.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import save_file

import deltatune
from deltatune.algebra.lines import lines_factor, num_layers
from deltatune.algebra.ops import OPS
from deltatune.core.registry import get_method
from deltatune.core.state import CONFIG_FILE, DELTATUNE_FILE, WEIGHTS_FILE, to_file_key
from deltatune.utils.errors import ConfigError
from deltatune.utils.io import atomic_dir

LINEAR_OPS = ("task_arithmetic", "linear")


def concat_coefficients(recipe) -> list[float]:
    """c_k of a weighted-sum op (see the module docstring); refuses ops that are not weighted sums."""
    p = recipe.op_params()
    if recipe.method not in LINEAR_OPS or p.sparsify is not None or p.consensus is not None:
        raise ConfigError(f"lora.mode concat is exact only for weighted sums ({', '.join(LINEAR_OPS)}); for {recipe.method!r} use lora.mode svd with a rank")
    total = sum(p.weights) if p.normalize else 1.0
    return [p.lambda_ * w / total for w in p.weights]


def lowrank_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with B @ A the best rank-r approximation of ``delta`` [out, in]."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, S.numel())
    B, A = U[:, :r] * S[:r], Vh[:r]
    if r < rank:  # a layer smaller than the rank: pad with zero directions so every module has rank r
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
    return B, A


@torch.no_grad()
def merge_lora_adapters(recipe, plan) -> dict:
    inputs = plan.inputs
    if any(i.saved for i in inputs):
        raise ConfigError("merging LoRA adapters with modules_to_save (trained heads) into one adapter is not supported; write a HF model directory instead")
    mode = recipe.lora.mode if recipe.lora is not None else "concat"
    modules = list(dict.fromkeys(m for i in inputs for m in i.modules))
    # Each input's largest rank over its modules (known from shapes when it was validated).
    ranks = [max(i.ranks.values(), default=0) for i in inputs]
    if mode == "concat":
        coeffs = concat_coefficients(recipe)
        rank = sum(ranks)
    else:
        rank = recipe.lora.rank
        spec, params = OPS[recipe.method], recipe.op_params()
        generator = torch.Generator().manual_seed(params.seed)
    tensors: dict[str, torch.Tensor] = {}
    names = {}
    for module in modules:
        base = {n: plan.base.tensors.get(n) for n in (f"{module}.weight", f"{module}.bias") if n in plan.base.tensors.infos}
        factors = [i.low_rank_factors(module, base) for i in inputs]
        shape_w = plan.base.tensors.shape(f"{module}.weight")
        if mode == "concat":
            Bs, As = [], []
            for f, c, r in zip(factors, coeffs, ranks):
                if f is not None:
                    A_k, B_k = f[0], f[1] * c
                    pad = r - A_k.shape[0]  # a module below the adapter's rank (rank_pattern, AdaLoRA): zero directions
                    Bs.append(torch.cat([B_k, B_k.new_zeros(B_k.shape[0], pad)], 1) if pad > 0 else B_k)
                    As.append(torch.cat([A_k, A_k.new_zeros(pad, A_k.shape[1])], 0) if pad > 0 else A_k)
                else:  # this adapter leaves the module alone: zero directions keep the rank uniform
                    Bs.append(torch.zeros(shape_w[0], r))
                    As.append(torch.zeros(r, shape_w[1]))
            B, A = torch.cat(Bs, 1), torch.cat(As, 0)
        else:
            deltas = [f[1] @ f[0] if f is not None else torch.zeros(shape_w) for f in factors]
            merged = spec.fn(None, deltas, dataclasses.replace(params, name=module, generator=generator))
            if recipe.lines is not None:
                merged = merged * lines_factor(f"{module}.weight", num_layers(plan.base.config, plan.base.tensors.keys()), recipe.lines.alpha, recipe.lines.beta)
            B, A = lowrank_svd(merged, rank)
        name = next(i.logical[module] for i in inputs if module in i.logical)
        names[module] = name
        tensors[to_file_key(f"{name}.lora_A.weight")] = A.contiguous()
        tensors[to_file_key(f"{name}.lora_B.weight")] = B.contiguous()
    lora = get_method("lora")
    config = lora.config_class(r=rank, alpha=float(rank), targets=list(names.values()))
    with atomic_dir(recipe.output.path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        peft = lora.to_peft_config(config, list(names.values()), list(names.values()))
        peft.update({"base_model_name_or_path": inputs[0].base_model_name, "task_type": _task_type(inputs[0]),
                     "inference_mode": True, "revision": None, "peft_version": None})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n")
        own = {"deltatune_version": deltatune.__version__, "method": "lora", "config": config.model_dump(mode="json"), "modules": list(names.values())}
        (tmp / DELTATUNE_FILE).write_text(json.dumps(own, indent=2) + "\n")
        report = {"output": recipe.output.path, "format": "adapter", "method": recipe.method, "lora_mode": mode, "rank": rank, "modules": len(modules)}
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _task_type(adapter) -> str | None:
    try:
        return json.loads((adapter.path / CONFIG_FILE).read_text()).get("task_type")
    except (OSError, ValueError):
        return None
