"""Checkpoints: every piece of a run's state, written atomically.

    <run>/checkpoints/step-000100/
        trainable.safetensors   the parameters the run trains (the set fixed when it started), by full name
        owned.pt                the state each part of the run owns: ``{part: part.state_dict()}`` for the
                                optimizer, the schedule, the token selector …, and ``delta``: what each
                                delta branch declares in ``training_state()`` (tensors and numbers only;
                                loaded weights_only=True)
        state.json              step, data stream, RNG states (CPU and this process's CUDA device),
                                early-stopping state

A checkpoint directory is built under a temporary name (``.step-….tmp``) and renamed into place, so
a crash mid-write leaves the previous checkpoint intact; the next save or resume removes the leftover.
Only the newest ``keep_last`` are kept.
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

DELTA_PART = "delta"  # the key of the model's own training state in owned.pt


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():  # dropout on the GPU draws from the device's generator, not the CPU's
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def remove_partial(run_dir: Path) -> None:
    """Delete what a killed checkpoint write left behind (``atomic_dir``'s hidden temp/old directories)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainable: list[str], parts: dict[str, Any],
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write step ``step``: the ``trainable`` parameters of ``model``, every part's ``state_dict()``
    (optimizer, scheduler …), the model's declared ``training_state()`` and the JSON ``state``."""
    remove_partial(run_dir)
    target = checkpoint_dir(run_dir, step)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu().contiguous() for n in trainable}
    owned = {name: part.state_dict() for name, part in parts.items()}
    if hasattr(model, "training_state"):  # a DeltaModel: whatever its methods' branches declared
        owned[DELTA_PART] = model.training_state()
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(owned, tmp / "owned.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_state()}))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def load_checkpoint(run_dir: Path, model: torch.nn.Module, trainable: list[str], parts: dict[str, Any]) -> dict[str, Any]:
    """Restore the newest checkpoint of ``run_dir`` into the model and ``parts``; return its JSON state.

    The model's training state goes first: it may change what a parameter is (LT-SFT's dense phase
    ends, releasing its dense ΔW), and the parameters' shapes are checked against the result.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise DeltatuneError(f"--resume {str(run_dir)!r}: no checkpoint found under {run_dir / 'checkpoints'}")
    ckpt = found[-1]
    if not (ckpt / "owned.pt").is_file():
        raise DeltatuneError(f"{ckpt}: no owned.pt (written by an older deltatune, without the optimizer's and methods' state); start the run again")
    owned = torch.load(ckpt / "owned.pt", weights_only=True)
    missing = sorted(set(parts) - set(owned))
    if missing:
        raise DeltatuneError(f"{ckpt}: the checkpoint has no {missing[0]} state; resume with the recipe the run was started with")
    if DELTA_PART in owned:
        model.load_training_state(owned[DELTA_PART])
    _load_parameters(ckpt, model, trainable)
    for name, part in parts.items():
        part.load_state_dict(owned[name])
    state = json.loads((ckpt / "state.json").read_text())
    set_rng_state(state["rng"])
    return state


@torch.no_grad()
def _load_parameters(ckpt: Path, model: torch.nn.Module, trainable: list[str]) -> None:
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    if set(tensors) != set(trainable):
        missing = sorted(set(trainable) - set(tensors))[:1] or sorted(set(tensors) - set(trainable))[:1]
        raise DeltatuneError(f"{ckpt}: checkpoint does not match this recipe's trainable parameters (first difference: {missing[0]!r})")
    params = dict(model.named_parameters())
    for name in trainable:
        if tuple(tensors[name].shape) != tuple(params[name].shape):
            raise DeltatuneError(
                f"{ckpt}: parameter {name!r} has shape {list(tensors[name].shape)} in the checkpoint but "
                f"{list(params[name].shape)} in this recipe's model; resume with the recipe the run was started with"
            )
    for name in trainable:
        params[name].copy_(tensors[name])
