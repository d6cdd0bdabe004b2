"""Tiny checkpoints for merge tests: a base llama and fine-tunes that differ by seeded perturbations."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import save_tiny_lm


def perturbed_copy(base_dir: Path, out_dir: Path, seed: int, std: float = 0.01) -> Path:
    """A "fine-tune" of ``base_dir``: every tensor plus N(0, std²) noise, saved as a HF directory."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out_dir)
    return out_dir


def make_checkpoints(root: Path, n: int = 3) -> tuple[Path, list[Path]]:
    base = save_tiny_lm(root / "base", seed=0)
    return Path(base), [perturbed_copy(Path(base), root / f"ft{i}", seed=100 + i) for i in range(n)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def naive_ties(tasks, weights, density):
    """TIES by hand: trim each τ to its top-k |entries|, elect the sign of Σ w τ, weighted mean of agreeing entries."""
    trimmed = []
    for t in tasks:
        flat = t.reshape(-1)
        k = int(density * flat.numel())
        keep = set(sorted(range(flat.numel()), key=lambda i: -abs(flat[i].item()))[:k])
        trimmed.append([flat[i].item() if i in keep else 0.0 for i in range(flat.numel())])
    out = []
    for j in range(len(trimmed[0])):
        s = sum(w * t[j] for w, t in zip(weights, trimmed))
        sign = 1.0 if s >= 0 else -1.0
        num = sum(w * t[j] for w, t in zip(weights, trimmed) if t[j] != 0 and (w * t[j] > 0) == (sign > 0))
        den = sum(w for w, t in zip(weights, trimmed) if t[j] != 0 and (w * t[j] > 0) == (sign > 0))
        out.append(num / den if den else 0.0)
    return torch.tensor(out).view_as(tasks[0])


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
