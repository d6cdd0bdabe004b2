"""Exact resume: for every registered method and every registered optimizer, a run stopped at step
K and resumed gives bit for bit the losses of steps K+1…N of the uninterrupted run. Each case's
options are set so that the state a method, optimizer, selector or schedule owns changes before K
(sparse support moves, HFT stages, rank growth, LISA's layer draw, GaLore's subspace …). The same
holds after a Ctrl-C right after a weight update and after a SIGKILL in the middle of a checkpoint
write (which must leave no partial directory once the run resumed)."""
import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
import types

import pytest
import torch
from transformers import PreTrainedTokenizerBase

import deltatune
import deltatune.optim
from deltatune.optim import OPTIMIZERS
from deltatune.train.config import TrainRecipe
from deltatune.train import checkpoint, loop
from deltatune.train.loop import train
from tests.helpers import save_tiny_bert, save_tiny_lm

N, K = 6, 3
for _module in pkgutil.iter_modules(deltatune.optim.__path__):  # every optimizer module registers itself at import
    importlib.import_module(f"deltatune.optim.{_module.name}")

# Options that make a method's own state change within the first K steps.
METHOD_OPTIONS = {
    "sparse_dynamic": {"update_every": 2, "density": 0.05},
    "hft": {"stage_steps": 2},
    "lt_sft": {"dense_steps": 2, "density": 0.05},
}
# (delta, extra train options) variants that exercise a method's options or the trainer's.
VARIANTS = {
    # Enough modules and growth per step that losing the importance averages changes which modules grow.
    "lora-incremental": ({"method": "lora", "r": 4, "targets": "all-linear", "rank_allocation": "incremental", "grow_every": 2,
                          "grow_count": 5, "importance_beta": 0.95}, {}),
    "lora-pissa": ({"method": "lora", "r": 4, "init": "pissa"}, {}),
    "lora-dropout": ({"method": "lora", "r": 4, "dropout": 0.2}, {}),
    "lora-token_selection": ({"method": "lora", "r": 4}, {"token_selection": {"keep_ratio": 0.5, "beta": 0.5}}),
    "lora-grad_accum": ({"method": "lora", "r": 4}, {"grad_accum": 2, "batch_size": 2}),
}
# Options that make an optimizer's own state change within the first K steps (full fine-tuning).
OPTIM_OPTIONS = {
    "galore": {"galore": {"rank": 4, "update_gap": 2}},
    "lisa": {"lisa": {"layers": 1, "interval": 2}},
    "mezo": {"lr": 1e-3},
    "sparse_mezo": {"lr": 1e-3},
}
OPTIM_VARIANTS = {"galore-layerwise": ("galore", {"galore": {"rank": 4, "update_gap": 2, "layerwise": True}})}
CLASSIFICATION_ONLY = {"bitfit"}  # the tiny llama has no biases

CASES = (
    [pytest.param({"method": m, **METHOD_OPTIONS.get(m, {})}, "adamw", {}, {}, id=m) for m in deltatune.list_methods()]
    + [pytest.param(delta, "adamw", {}, loop, id=name) for name, (delta, loop) in VARIANTS.items()]
    + [pytest.param(None, o, OPTIM_OPTIONS.get(o, {}), {}, id=f"optim-{o}") for o in sorted(OPTIMIZERS)]
    + [pytest.param(None, o, opts, {}, id=f"optim-{name}") for name, (o, opts) in OPTIM_VARIANTS.items()]
)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """One thread (the recipes set train.threads: 1; tiny matrices only lose to thread hand-offs on a
    shared machine), restored afterwards; no loss plot (matplotlib is most of a tiny run's time)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(loop, "plot_loss_curve", lambda *args, **kwargs: None)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    bert = save_tiny_bert(root / "bert")
    rows = [{"text": f"{'cat sat on the mat' if i % 2 else 'dog is the one'} {i % 7}", "label": i % 2} for i in range(32)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"lm": save_tiny_lm(root / "lm"), "bert": bert, "cls_data": root / "cls.jsonl"}


def recipe(models, out, name, delta, optim, optim_options, loop) -> TrainRecipe:
    classification = delta is not None and delta["method"] in CLASSIFICATION_ONLY
    data = ({"data": {"path": str(models["cls_data"]), "eval_fraction": 0.25}} if classification
            else {"generate": {"task": "addition", "n_train": 32, "n_eval": 4, "digits": 2}, "data": {"template": "plain"}})
    return TrainRecipe.model_validate({
        "model": {"name": str(models["bert" if classification else "lm"]), "task": "sequence-classification" if classification else "causal-lm"},
        "delta": delta,
        **data,
        "optim": {"name": optim, "lr": 1e-2, **optim_options},
        "train": {"max_steps": N, "batch_size": 4, "log_every": 1, "progress": False, "keep_last": 5, "threads": 1, **loop},
        "eval": {"metric": "loss", "max_batches": 1},
        "output": {"dir": str(out), "name": name},
    })


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses_after(k: int, full, resumed) -> None:
    expected, got = losses(full.run_dir), losses(resumed.run_dir)
    assert sorted(got) == list(range(1, N + 1))
    assert [got[s] for s in range(k + 1, N + 1)] == [expected[s] for s in range(k + 1, N + 1)]


@pytest.mark.parametrize("delta,optim,optim_options,loop", CASES)
def test_resume_is_bit_exact(models, tmp_path, delta, optim, optim_options, loop):
    full = recipe(models, tmp_path, "full", delta, optim, optim_options, loop)
    cut = recipe(models, tmp_path, "cut", delta, optim, optim_options, loop)
    train(full)
    assert train(cut, stop_after=K)["stopped"]
    train(cut, resume=cut.run_dir)
    assert_same_losses_after(K, full, cut)


def test_ctrl_c_right_after_the_update_replays_no_batch(models, tmp_path, monkeypatch):
    delta = {"method": "lora", "r": 4}
    full, cut = (recipe(models, tmp_path, name, delta, "adamw", {}, {}) for name in ("full", "cut"))
    train(full)
    build = loop.build_optimizer

    def build_interrupted(*args, **kwargs):
        """The optimizer, with a Ctrl-C arriving right after its K-th update, before the step counter moves."""
        opt = build(*args, **kwargs)
        real_step, calls = opt.step, []

        def step_then_ctrl_c(self, *a, **k):
            out = real_step(*a, **k)
            calls.append(1)
            if len(calls) == K:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        opt.step = types.MethodType(step_then_ctrl_c, opt)  # a bound method: the lr scheduler wraps it
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build_interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    monkeypatch.setattr(loop, "build_optimizer", build)
    assert [p.name for p in (cut.run_dir / "checkpoints").iterdir()] == [f"step-{K:06d}"]  # the update of step K counted
    train(cut, resume=cut.run_dir)
    assert_same_losses_after(K, full, cut)


KILL_DURING_WRITE = """
import json, os, signal, sys
from deltatune.train import checkpoint
from deltatune.train.config import TrainRecipe
from deltatune.train.loop import train

real_save_file = checkpoint.save_file


def save_file_then_die(tensors, path):
    real_save_file(tensors, path)
    if sys.argv[2] in path:  # the first file of that checkpoint is written, the directory not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_file = save_file_then_die
train(TrainRecipe.model_validate(json.loads(sys.argv[1])))
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(models, tmp_path):
    delta = {"method": "sparse_dynamic", **METHOD_OPTIONS["sparse_dynamic"]}
    full, cut = (recipe(models, tmp_path, name, delta, "adamw", {}, {"save_every": 2}) for name in ("full", "cut"))
    train(full)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, json.dumps(cut.model_dump(mode="json")), "step-000004"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in (cut.run_dir / "checkpoints").iterdir())
    assert left[0].startswith(".step-000004.") and left[1:] == ["step-000002"]  # killed mid-write: only a hidden partial
    train(cut, resume=cut.run_dir)
    assert sorted(p.name for p in (cut.run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert_same_losses_after(2, full, cut)


def test_full_finetuning_output_is_written_atomically(models, tmp_path, monkeypatch):
    run = recipe(models, tmp_path, "ft", None, "adamw", {}, {"max_steps": 1})

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)  # the model's files are written by then
    with pytest.raises(OSError, match="No space left"):
        train(run)
    assert not [p.name for p in run.run_dir.iterdir() if "model" in p.name]  # neither model/ nor a hidden partial


def test_checkpoint_rng_state_includes_the_cuda_generator(monkeypatch):
    """No GPU here: a stand-in device generator shows the CUDA state is saved and restored with the CPU's."""
    device = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: device.update(state=state))
    saved = json.loads(json.dumps(checkpoint.rng_state()))  # as state.json stores it
    device["state"] = torch.zeros(16, dtype=torch.uint8)
    checkpoint.set_rng_state(saved)
    assert device["state"].tolist() == list(range(16))
