"""Grafting / skill localisation (Panigrahi et al., 2023): keep a fine-tuned model's skill in a
sparse set of its weight changes.

Given a base θ₀ and a fine-tuned θ_ft of the same architecture, per target matrix keep the
``k = ⌊density·out·in⌋`` entries of largest |Δθ| = |θ_ft − θ₀| and graft them onto the base::

    θ_graft = θ₀ + mask ⊙ Δθ

The graft is an ordinary sparse delta (method ``lt_sft``: indices + values), so it saves, loads,
merges and composes like any other. :func:`graft_curve` reports a metric of the graft against
density (accuracy kept vs density); :func:`graft_report` is the whole run behind ``deltatune graft``:
model directories (+ eval data) in; a curve (JSON + PNG) and the saved grafted delta out.

Weights that are not target matrices (a new classification head) cannot be masked entry by
entry; ``modules_to_save`` copies them from the fine-tuned model in full, stored in the delta
as PEFT's ``modules_to_save`` (the default for sequence classification: the head).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deltatune.algebra.sparse import top_k_indices
from deltatune.core.delta_model import DeltaModel
from deltatune.core.full_copy import FullCopyBranch
from deltatune.core.inject import iter_wrappers
from deltatune.utils.errors import ConfigError, DataError, ShapeMismatchError
from deltatune.utils.io import atomic_dir

REPORT_FILE = "graft_report.json"
PLOT_FILE = "graft_curve.png"
DELTA_DIR = "delta"
DEFAULT_DENSITIES = (0.001, 0.01, 0.05, 0.1, 0.25)


def check_density(density: float, what: str = "density") -> float:
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"graft: {what} must be in (0, 1], got {density}")
    return float(density)


def graft(base: nn.Module, finetuned: nn.Module, density: float, targets: str | list[str] = "all-linear", name: str = "graft",
          modules_to_save: list[str] = ()) -> DeltaModel:
    """Attach to ``base`` the sparse delta top-``density`` of |θ_ft − θ₀| per target matrix (see module doc);
    the modules in ``modules_to_save`` take the fine-tuned model's weights in full."""
    check_density(density)
    ft = dict(finetuned.named_parameters())
    model = DeltaModel.of(base)
    model.attach({"method": "lt_sft", "density": density, "targets": targets, "modules_to_save": list(modules_to_save)}, name=name)
    try:
        with torch.no_grad():
            for module_name, wrapper in iter_wrappers(model.base_model):
                if name not in wrapper.deltas:
                    continue
                branch = wrapper.deltas[name]
                if isinstance(branch, FullCopyBranch):
                    for pname, p in branch.modules_to_save.named_parameters():
                        p.copy_(_finetuned_tensor(ft, f"{module_name}.{pname}", p))
                    continue
                w0 = wrapper.base_layer.weight
                diff = (_finetuned_tensor(ft, module_name + ".weight", w0).float() - w0.float()).reshape(-1)
                branch.set_support(top_k_indices(diff, branch.sparse_values.numel()))
                branch.sparse_values.copy_(diff[branch.sparse_indices.long()].to(branch.sparse_values.dtype))
    except BaseException:
        model.detach(name)
        raise
    return model


def _finetuned_tensor(ft: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in ft:
        raise ShapeMismatchError(f"graft: the fine-tuned model has no parameter {key!r}; is it the same architecture as the base?")
    if ft[key].shape != like.shape:
        raise ShapeMismatchError(f"graft: {key!r} is {list(ft[key].shape)} in the fine-tuned model but {list(like.shape)} in the base")
    return ft[key].detach().to(like.device)


def change_kept(model: DeltaModel, finetuned: nn.Module, name: str = "graft") -> float:
    """Σ‖mask ⊙ Δθ‖² / Σ‖Δθ‖² over the grafted matrices: the share of the fine-tuning change kept (no data needed)."""
    ft = dict(finetuned.named_parameters())
    kept = total = 0.0
    for module_name, wrapper in iter_wrappers(model.base_model):
        branch = wrapper.deltas[name] if name in wrapper.deltas else None
        if branch is None or isinstance(branch, FullCopyBranch):
            continue
        diff = ft[module_name + ".weight"].detach().float() - wrapper.base_layer.weight.detach().float()
        total += float(diff.pow(2).sum())
        kept += float(branch.sparse_values.detach().float().pow(2).sum())
    return kept / total if total else 1.0


def graft_curve(base_factory: Callable[[], nn.Module], finetuned: nn.Module, densities: list[float], metric: Callable[[nn.Module], float],
                targets: str | list[str] = "all-linear") -> list[dict[str, float]]:
    """``[{"density": d, "metric": metric(graft(base, ft, d)), "kept": metric / metric(ft)}]`` for each density."""
    full = metric(finetuned)
    rows = []
    for d in densities:
        value = metric(graft(base_factory(), finetuned, d, targets))
        rows.append({"density": d, "metric": value, "kept": value / full if full else float("nan")})
    return rows


def graft_report(base: str, finetuned: str, out: str | Path, densities: list[float] = DEFAULT_DENSITIES, data: str | None = None,
                 task: str = "causal-lm", num_labels: int | None = None, max_examples: int | None = None, targets: str | list[str] = "all-linear",
                 save_density: float | None = None, keep: float = 0.99, modules_to_save: list[str] | None = None, log=print) -> dict:
    """Graft ``finetuned`` onto ``base`` at each density; write ``out/`` (atomically) with the report, the plot and the delta.

    ``out/graft_report.json``: per density the entries kept, their bytes (int32 index + value), the
    share of ‖Δθ‖² kept and, with ``data``, the metric and the share of the fine-tuned metric kept
    (accuracy for sequence classification; loss, as ft_loss / loss, for causal LMs).
    ``out/graft_curve.png``: that curve. ``out/delta/``: the graft at ``save_density`` — by default
    the smallest density keeping ≥ ``keep`` of the fine-tuned metric (with data), else the largest
    density — a sparse ``lt_sft`` delta that loads with :func:`deltatune.load_delta` and merges.
    """
    import deltatune

    densities = sorted({check_density(d, "densities") for d in densities})
    if not densities:
        raise ConfigError("graft: densities is empty; give at least one density in (0, 1]")
    if save_density is not None:
        check_density(save_density, "save_density")
    if data is not None and not Path(data).exists():
        raise DataError(f"graft: eval data {str(data)!r} does not exist")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"graft: output {str(out)!r} exists and is not a directory")

    classification = task == "sequence-classification"
    if classification and num_labels is None:
        from transformers import AutoConfig

        num_labels = AutoConfig.from_pretrained(finetuned).num_labels
    ft_model = deltatune.load_model(finetuned, task=task, num_labels=num_labels if classification else None)
    evaluator = None
    if data is not None:
        from deltatune.algebra.soup import Evaluator

        evaluator = Evaluator(base, data, task, num_labels, max_examples)
        base_model = evaluator.model
    else:
        base_model = deltatune.load_model(base, task=task, num_labels=num_labels if classification else None)
    if modules_to_save is None:
        from deltatune.train.setup import default_head_names

        modules_to_save = default_head_names(base_model) if classification else []

    def score(model) -> dict[str, float] | None:
        if evaluator is None:
            return None
        from deltatune.train.loop import evaluate
        from deltatune.train.objective import CausalLMObjective, ClassificationObjective

        objective = ClassificationObjective(model) if classification else CausalLMObjective(model)
        return evaluate(model, objective, evaluator.data, evaluator.recipe, evaluator.tokenizer)

    from deltatune.train.loop import primary_metric

    ft_metrics, base_metrics = score(ft_model), score(base_model)
    key, higher = primary_metric(ft_metrics) if ft_metrics else (None, True)
    rows = []
    for d in densities:
        model = graft(base_model, ft_model, d, targets, name="graft", modules_to_save=modules_to_save)
        try:
            entries = sum(w.deltas["graft"].sparse_values.numel() for _, w in iter_wrappers(model.base_model)
                          if "graft" in w.deltas and not isinstance(w.deltas["graft"], FullCopyBranch))
            row = {"density": d, "entries": entries, "sparse_bytes": entries * (4 + 4), "change_kept": change_kept(model, ft_model)}
            metrics = score(model)
            if metrics is not None:
                value, full = metrics[key], ft_metrics[key]
                row.update(metric=value, kept=(value / full if higher else full / value) if value and full else float("nan"))
        finally:
            model.detach("graft")
        rows.append(row)
        log(f"density {d:g}: {entries:,} entries, change kept {row['change_kept']:.4f}" + (f", {key} {row['metric']:.4f} (kept {row['kept']:.4f})" if "metric" in row else ""))

    if save_density is None:
        good = [r["density"] for r in rows if r.get("kept", 0) >= keep] if evaluator is not None else []
        save_density = good[0] if good else (max(rows, key=lambda r: r.get("kept", 0))["density"] if evaluator is not None else densities[-1])
    model = graft(base_model, ft_model, save_density, targets, name="graft", modules_to_save=modules_to_save)
    try:
        sparse = [w for _, w in iter_wrappers(model.base_model) if "graft" in w.deltas and not isinstance(w.deltas["graft"], FullCopyBranch)]
        report = {"base": str(base), "finetuned": str(finetuned), "targets": targets, "modules_to_save": list(modules_to_save), "metric": key,
                  "finetuned_metrics": ft_metrics, "base_metrics": base_metrics, "densities": rows, "saved_density": save_density,
                  "dense_bytes": sum(w.base_layer.weight.numel() * w.base_layer.weight.element_size() for w in sparse)}
        with atomic_dir(out) as tmp:
            model.save_delta(str(tmp / DELTA_DIR), name="graft")
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            plot_curve(rows, key, tmp / PLOT_FILE, f"graft {Path(str(finetuned)).name} onto {Path(str(base)).name}")
    finally:
        model.detach("graft")
    report.update(out=str(out), delta=str(Path(out) / DELTA_DIR), plot=str(Path(out) / PLOT_FILE))
    return report


def plot_curve(rows: list[dict], metric: str | None, path: Path, title: str) -> None:
    """Share kept (of the fine-tuned metric, and of ‖Δθ‖²) against density, log-scaled density axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["density"] for r in rows]
    if metric is not None:
        ax.plot(x, [r["kept"] for r in rows], "o-", label=f"{metric} kept (vs fine-tuned)")
    ax.plot(x, [r["change_kept"] for r in rows], "s--", label="share of ||Δθ||² kept")
    ax.set_xscale("log")
    ax.set_xlabel("density (share of each matrix's entries)")
    ax.set_ylabel("kept")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
