"""Checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

    <run>/checkpoints/step-000100/
        trainable.safetensors   every parameter that requires grad, by its full name
        optimizer.pt            optimizer state (tensors and numbers only; loaded weights_only=True)
        state.json              step, scheduler, data stream, RNG states, early-stopping state

A checkpoint directory is built under a temporary name and renamed into place, so a crash
mid-write leaves the previous checkpoint intact. Only the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deltatune.utils.errors import DeltatuneError
from deltatune.utils.io import atomic_dir


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any], keep_last: int) -> Path:
    target = checkpoint_dir(run_dir, step)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full = {**state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_state()}
        (tmp / "state.json").write_text(json.dumps(full))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore the newest checkpoint of ``run_dir`` into model/optimizer/scheduler; return its state."""
    found = list_checkpoints(run_dir)
    if not found:
        raise DeltatuneError(f"--resume {str(run_dir)!r}: no checkpoint found under {run_dir / 'checkpoints'}")
    ckpt = found[-1]
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:1] or sorted(set(tensors) - set(params))[:1]
        raise DeltatuneError(f"{ckpt}: checkpoint does not match this recipe's trainable parameters (first difference: {missing[0]!r})")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise DeltatuneError(
                f"{ckpt}: parameter {name!r} has shape {list(tensors[name].shape)} in the checkpoint but "
                f"{list(p.shape)} in this recipe's model; resume with the recipe the run was started with"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
