"""The merge engine: a validated recipe → an output directory, one module's tensors at a time.

1. open the base and every input and validate architectures, names and shapes from file headers —
   a bad input fails here, before any tensor is read or any file written;
2. for each module of the base (in file order): read its base tensors, ask each input for its task
   vectors there, run the registered op per tensor, apply LiNeS, keep the result;
3. write the output inside :func:`~deltatune.utils.io.atomic_dir`: an interrupted or failed merge
   leaves no (partial) output directory.

Peak memory: the merged model plus the tensors of one module of every input.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.algebra.lines import lines_factor, num_layers
from deltatune.algebra.lora_merge import merge_lora_adapters
from deltatune.algebra.ops import MODEL_OPS, OPS
from deltatune.algebra.recipe import MergeRecipe
from deltatune.algebra.sparse import to_sparse, write_sparse
from deltatune.algebra.task_vector import AdapterInput, BaseCheckpoint, FullInput, module_of, open_input
from deltatune.utils.errors import ConfigError
from deltatune.utils.io import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
REPORT_FILE = "merge_report.json"


@dataclasses.dataclass
class MergePlan:
    base: BaseCheckpoint
    inputs: list  # FullInput | AdapterInput, in recipe order

    def close(self) -> None:
        self.base.tensors.close()
        for i in self.inputs:
            i.close()


def open_plan(recipe: MergeRecipe) -> MergePlan:
    """Open and validate every checkpoint of the recipe (headers only)."""
    inputs = [open_input(spec.path) for spec in recipe.inputs]
    if recipe.base is not None:
        base = BaseCheckpoint(recipe.base)
    else:  # a soup without a base: the first input is only the reference the others are measured from
        if not isinstance(inputs[0], FullInput):
            raise ConfigError(f"method {recipe.method!r} without 'base' needs full model directories as inputs; {recipe.inputs[0].path!r} is a delta")
        base = BaseCheckpoint(recipe.inputs[0].path)
    for spec, inp in zip(recipe.inputs, inputs):
        inp.validate(base)
        if Path(spec.path).resolve() == Path(recipe.output.path).resolve():
            raise ConfigError(f"output.path {recipe.output.path!r} is also an input; write the merge elsewhere")
    return MergePlan(base, inputs)


def output_format(recipe: MergeRecipe, plan: MergePlan) -> str:
    if recipe.output.format != "auto":
        fmt = recipe.output.format
    else:
        fmt = "adapter" if recipe.lora is not None else "hf"
    if fmt == "adapter":
        # A merged LoRA adapter is built from each input's exact low-rank factors; ask the method.
        for spec, inp in zip(recipe.inputs, plan.inputs):
            if not isinstance(inp, AdapterInput):
                raise ConfigError(f"output.format adapter (a merged LoRA adapter) needs low-rank deltas as inputs; {spec.path!r} is a {inp.kind} input; write a HF model directory instead")
            if not inp.method.capabilities.low_rank_factors:
                raise ConfigError(f"output.format adapter (a merged LoRA adapter) needs low-rank deltas as inputs; {spec.path!r} is a {inp.method.name} delta, "
                                  "which has no exact low-rank factors; write a HF model directory instead")
    return fmt


def run_merge(recipe: MergeRecipe, log=print) -> dict:
    """Run ``recipe``; returns a small report (also written to the output as ``merge_report.json``)."""
    if recipe.method in MODEL_OPS:
        return MODEL_OPS[recipe.method].fn(recipe, log=log)
    start = time.perf_counter()
    plan = open_plan(recipe)
    try:
        fmt = output_format(recipe, plan)
        if fmt == "adapter":
            report = merge_lora_adapters(recipe, plan)
        elif fmt == "sparse":
            report = write_sparse_delta(recipe, plan)
        else:
            report = write_full_model(recipe, plan)
    finally:
        plan.close()
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def module_groups(names: list[str]) -> dict[str, list[str]]:
    """Tensor names grouped by module, in first-seen order (a module's weight and bias together)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(module_of(n), []).append(n)
    return groups


@torch.no_grad()
def merged_tensors(recipe: MergeRecipe, plan: MergePlan):
    """Yield ``(name, base tensor, merged task vector or None)`` for every base tensor, module by module.

    ``None``: no input changes that tensor (it is copied from the base unchanged).
    """
    spec = OPS[recipe.method]
    params = recipe.op_params()
    generator = torch.Generator().manual_seed(params.seed)
    names = plan.base.tensors.keys()
    layers = num_layers(plan.base.config, names)
    for module, group in module_groups(names).items():
        base = {n: plan.base.tensors.get(n) for n in group}
        per_input = [inp.task_vectors(module, base) if inp.touches(module) else {} for inp in plan.inputs]
        for n in group:
            found = [tv.get(n) for tv in per_input]
            if all(t is None for t in found):
                yield n, base[n], None
                continue
            tasks = [t if t is not None else torch.zeros(base[n].shape) for t in found]
            merged = spec.fn(base[n], tasks, dataclasses.replace(params, name=n, generator=generator))
            if recipe.lines is not None:
                merged = merged * lines_factor(n, layers, recipe.lines.alpha, recipe.lines.beta)
            yield n, base[n], merged
        del base, per_input


def write_full_model(recipe: MergeRecipe, plan: MergePlan) -> dict:
    """θ = θ_base + merged τ for every tensor, saved as a HF directory (config + tokenizer from the base)."""
    out_dtype = DTYPES.get(recipe.output.dtype)
    tensors: dict[str, torch.Tensor] = {}
    changed = 0
    with atomic_dir(recipe.output.path) as tmp:
        for name, base, merged in merged_tensors(recipe, plan):
            dtype = out_dtype or base.dtype
            if merged is None:
                tensors[name] = base.to(dtype)
            else:
                tensors[name] = (base.float() + merged).to(dtype)
                changed += 1
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        copy_model_files(plan.base.dir, tmp)
        report = {
            "output": str(recipe.output.path), "format": "hf", "method": recipe.method, "base": plan.base.name,
            "inputs": [{"path": s.path, "kind": i.kind, "weight": s.weight} for s, i in zip(recipe.inputs, plan.inputs)],
            "tensors_changed": changed, "lines": None if recipe.lines is None else recipe.lines.model_dump(),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_sparse_delta(recipe: MergeRecipe, plan: MergePlan) -> dict:
    """The merged task vector as a sparse delta (non-zero entries, or the top ``output.density`` share)."""
    delta, kept, total = {}, 0, 0
    for name, base, merged in merged_tensors(recipe, plan):
        total += base.numel()
        if merged is not None:
            idx, val = to_sparse(merged, recipe.output.density)
            if idx.numel():
                delta[name] = (idx, val, tuple(base.shape))
                kept += idx.numel()
    write_sparse(recipe.output.path, delta, plan.base.name)
    return {"output": str(recipe.output.path), "format": "sparse", "method": recipe.method, "entries": kept, "density": kept / max(total, 1)}


def copy_model_files(source: Path, dest: Path) -> None:
    """Config, generation config and tokenizer files of the base (everything that is not weights)."""
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "model.safetensors.index.json" and f.name != REPORT_FILE:
            shutil.copy2(f, dest / f.name)
