"""Optimal-transport fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Two networks of the same architecture can compute the same function with their hidden neurons in
a different order, so averaging their weights position by position can mix unrelated neurons.
OT fusion first *aligns* each model's hidden neurons to a reference model's with an optimal
transport plan, then averages.

What gets aligned (a :class:`NeuronGroup`): a set of hidden units produced by the rows of some
"in" linears and consumed by the columns of some "out" linears. Permuting those rows and
columns together leaves the model's function unchanged, which is why aligning them is exact.

* plain MLP stacks (``nn.Sequential`` of Linear + parameter-free activations): the outputs of
  every Linear but the last, aligned layer by layer — later layers see their inputs already
  transported, as in the paper;
* transformer FFN blocks: BERT ``intermediate.dense`` → ``output.dense``, llama
  ``gate_proj``/``up_proj`` → ``down_proj``. The residual stream's basis is kept fixed (embeddings,
  norms, attention are averaged as they are), which keeps the alignment exact for the residual
  structure;
* optionally BERT attention heads (``heads=True``): whole heads of query/key/value, with the
  matching column blocks of ``attention.output.dense``.

Per group, with reference model A (``n`` units) and model B (``m`` units)::

    C[i, j] = ‖f_A(i) − f_B(j)‖²          f = the unit's incoming row (+ bias), and its outgoing
                                           column when that output lives in a fixed basis
    P = ot.emd(1/n, 1/m, C)              exact OT plan, [n, m]; a permutation / n when n == m
    T = n · P                             rows sum to 1
    W_in_B ← T @ W_in_B,  b_B ← T @ b_B,  W_out_B ← W_out_B @ Tᵀ

then ``fused = Σ_k w_k · aligned_k`` over every floating-point tensor.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.core.inject import iter_wrappers
from deltatune.utils.errors import ConfigError, ShapeMismatchError

# Modules that may sit between two Linears of an MLP stack without holding per-unit parameters.
_PARAMETER_FREE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class NeuronGroup:
    """Hidden units shared by the rows of ``inputs`` and the columns of ``outputs`` (module names).

    ``block``: units move in blocks of this many rows/columns (a head's ``head_dim``); 1 = single neurons.
    ``fixed_output``: the outputs live in a basis that is not aligned itself (the residual stream),
    so outgoing columns are valid alignment features.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    block: int = 1
    fixed_output: bool = True
    kind: str = field(default="ffn", compare=False)


def neuron_groups(model: nn.Module, heads: bool = False) -> list[NeuronGroup]:
    """The alignable groups of ``model`` in module order — an MLP stack's groups in forward order, which its
    layer-by-layer alignment needs. Found by structure (child names), not by model type."""
    groups: list[NeuronGroup] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(module.named_children())
        if heads and {"self", "output"} <= children.keys() and all(hasattr(children["self"], p) for p in ("query", "key", "value")) \
                and hasattr(children["output"], "dense"):
            size = getattr(children["self"], "attention_head_size", None)
            if size:
                groups.append(NeuronGroup((f"{prefix}self.query", f"{prefix}self.key", f"{prefix}self.value"), (f"{prefix}output.dense",), size, True, "heads"))
        if {"intermediate", "output"} <= children.keys() and hasattr(children["intermediate"], "dense") and hasattr(children["output"], "dense"):
            groups.append(NeuronGroup((f"{prefix}intermediate.dense",), (f"{prefix}output.dense",)))
        elif {"gate_proj", "up_proj", "down_proj"} <= children.keys():
            groups.append(NeuronGroup((f"{prefix}gate_proj", f"{prefix}up_proj"), (f"{prefix}down_proj",)))
        elif isinstance(module, nn.Sequential):
            groups.extend(_sequential_groups(prefix, module))
    return groups


def _sequential_groups(prefix: str, seq: nn.Sequential) -> list[NeuronGroup]:
    linears = [(i, n) for i, (n, m) in enumerate(seq.named_children()) if isinstance(m, nn.Linear)]
    children = list(seq.children())
    out = []
    for (i, a), (j, b) in zip(linears, linears[1:]):
        between = children[i + 1: j]
        if all(isinstance(m, _PARAMETER_FREE) for m in between):
            # Only the stack's last Linear writes to a basis no later group realigns.
            out.append(NeuronGroup((f"{prefix}{a}",), (f"{prefix}{b}",), fixed_output=False, kind="mlp"))
    return out


def _check_models(models: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    if len(models) < 2:
        raise ConfigError(f"OT fusion needs at least two models (got {len(models)})")
    states = []
    for k, model in enumerate(models):
        wrapped = next(iter_wrappers(model), None)
        if wrapped is not None:
            raise ConfigError(f"model {k} has deltas attached (at {wrapped[0]!r}); merge and export it (or unload) before OT fusion")
        states.append(model.state_dict())
    ref = states[0]
    for k, state in enumerate(states[1:], start=1):
        if type(models[k]) is not type(models[0]):
            raise ShapeMismatchError(f"model {k} is a {type(models[k]).__name__}, model 0 a {type(models[0]).__name__}; OT fusion needs one architecture")
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            raise ShapeMismatchError(f"model {k} has different parameters than model 0: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, tensor in ref.items():
            if state[key].shape != tensor.shape:
                raise ShapeMismatchError(f"model {k}: tensor {key!r} has shape {list(state[key].shape)}, model 0 has {list(tensor.shape)}")
    return states


def _features(state: dict[str, torch.Tensor], group: NeuronGroup) -> torch.Tensor:
    """[units, features]: each unit's incoming rows (+ bias) and, with a fixed output basis, its outgoing columns."""
    parts = []
    for name in group.inputs:
        w = state[f"{name}.weight"].double()
        parts.append(w)
        if f"{name}.bias" in state:
            parts.append(state[f"{name}.bias"].double()[:, None])
    if group.fixed_output:
        for name in group.outputs:
            parts.append(state[f"{name}.weight"].double().T)
    rows = torch.cat(parts, dim=1)
    return rows.reshape(rows.shape[0] // group.block, -1)


def transport_plan(ref_features: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Exact OT plan ``P`` [n, m] between uniform measures on the rows, cost = squared distance."""
    import ot

    n, m = ref_features.shape[0], features.shape[0]
    cost = torch.cdist(ref_features, features).pow(2).numpy()
    plan = ot.emd(torch.full((n,), 1.0 / n, dtype=torch.float64).numpy(), torch.full((m,), 1.0 / m, dtype=torch.float64).numpy(), cost)
    return torch.from_numpy(plan)


def _apply(state: dict[str, torch.Tensor], group: NeuronGroup, t: torch.Tensor) -> None:
    """W_in ← T W_in, b ← T b, W_out ← W_out Tᵀ (T expanded to blocks of ``group.block`` rows)."""
    if group.block > 1:
        t = torch.kron(t, torch.eye(group.block, dtype=t.dtype))
    for name in group.inputs:
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in state:
                state[key] = (t @ state[key].double()).to(state[key].dtype)
    for name in group.outputs:
        key = f"{name}.weight"
        state[key] = (state[key].double() @ t.T).to(state[key].dtype)


def align_to(reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor], groups: list[NeuronGroup]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """``state`` with its units transported onto ``reference``'s, group by group in forward order.

    Returns the aligned copy and the transport maps ``T`` (one per group; a permutation matrix
    when the plan is one).
    """
    aligned = {k: v.detach().clone() for k, v in state.items()}
    maps = []
    for group in groups:
        ref_f, f = _features(reference, group), _features(aligned, group)
        t = transport_plan(ref_f, f) * ref_f.shape[0]
        _apply(aligned, group, t)
        maps.append(t)
    return aligned, maps


def relabelled(model: nn.Module, seed: int, heads: bool = False) -> nn.Module:
    """A copy of ``model`` computing the same function with every alignable group's units in a
    random order — the case OT fusion exists for (and what its tests and demos fuse against)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for group in neuron_groups(model, heads=heads):
        n = state[f"{group.inputs[0]}.weight"].shape[0] // group.block
        _apply(state, group, torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)])
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def ot_fuse(models: list[nn.Module], weights: list[float] | None = None, heads: bool = False, reference: int = 0) -> dict[str, torch.Tensor]:
    """Align every model's hidden units to ``models[reference]`` and return the weighted average state dict.

    ``weights`` default to uniform and are normalised to sum to 1. Non-floating tensors (e.g.
    position-id buffers) are taken from the reference model.
    """
    states = _check_models(list(models))
    if weights is None:
        weights = [1.0] * len(states)
    if len(weights) != len(states):
        raise ConfigError(f"OT fusion got {len(weights)} weights for {len(states)} models")
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise ConfigError(f"OT fusion weights {list(weights)} sum to zero; they must sum to a non-zero value")
    if not 0 <= reference < len(states):
        raise ConfigError(f"reference index {reference} is out of range for {len(states)} models")
    groups = neuron_groups(models[reference], heads=heads)
    if not groups:
        raise ConfigError(f"{type(models[reference]).__name__} has no alignable hidden layers (MLP stacks, BERT or llama FFN blocks)")
    ref = {k: v.detach() for k, v in states[reference].items()}
    aligned = [ref if k == reference else align_to(ref, s, groups)[0] for k, s in enumerate(states)]
    fused = {}
    for key, tensor in ref.items():
        if not tensor.is_floating_point():
            fused[key] = tensor.clone()
            continue
        acc = sum((w / total) * a[key].double() for w, a in zip(weights, aligned))
        fused[key] = acc.to(tensor.dtype)
    return fused


def ot_fuse_model(models: list[nn.Module], weights: list[float] | None = None, heads: bool = False, reference: int = 0) -> nn.Module:
    """:func:`ot_fuse`, loaded into a copy of the reference model."""
    fused = ot_fuse(models, weights, heads, reference)
    model = copy.deepcopy(models[reference])
    model.load_state_dict(fused)
    return model


def merge_op(recipe, log=print) -> dict:
    """The ``ot_fusion`` method of ``deltatune merge``: full model directories (same architecture)
    → their OT-aligned weighted average, written as a HF directory like any other merge."""
    import json
    from pathlib import Path

    import transformers
    from safetensors.torch import save_file

    from deltatune.algebra.merge import REPORT_FILE, copy_model_files
    from deltatune.algebra.task_vector import check_full_inputs
    from deltatune.utils.io import atomic_dir

    paths = [spec.path for spec in recipe.inputs]
    names = check_full_inputs(paths, "ot_fusion")
    config = transformers.AutoConfig.from_pretrained(paths[0])
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ConfigError(f"ot_fusion: {paths[0]!r} names no transformers architecture in its config.json (architectures: {config.architectures})")
    models = [model_class.from_pretrained(p).eval() for p in paths]
    fused = ot_fuse(models, [spec.weight for spec in recipe.inputs], heads=recipe.parameters.heads)
    # Only the tensors the checkpoints hold (tied weights appear once), each with its own storage.
    tensors = {n: fused[n].contiguous().clone() for n in names if n in fused}
    report = {"output": str(recipe.output.path), "format": "hf", "method": "ot_fusion", "inputs": paths, "heads": recipe.parameters.heads,
              "aligned_groups": len(neuron_groups(models[0], recipe.parameters.heads))}
    with atomic_dir(recipe.output.path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_model_files(Path(paths[0]), tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
