"""Every field of an adapter directory, corrupted in turn: the pool refuses it while reading, before it
takes a slot, with a one-line reason that names the adapter but not the server's directory; the
slot stays free, and a good adapter loads into it afterwards."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.serve.adapter_pool import AdapterPool
from deltatune.utils.errors import DeltatuneError
from tests.helpers import randomize_delta, tiny_llama_config

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def served_weights(model) -> dict[str, torch.Tensor]:
    return {f"model.{n}": m.weight for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)}


def save_adapter(base, path, **config):
    model = deltatune.attach(base, {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], **config})
    randomize_delta(model, std=0.3)
    model.save_delta(path)
    model.detach("default")


def edit_tensors(path, change):
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def edit_json(path, name, change):
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def remove(d, key):
    del d[key]


CORRUPTIONS = {  # name → (function of the adapter dir, part of the expected message)
    "config missing": (lambda p: [(p / CONFIG_FILE).unlink(), (p / "deltatune.json").unlink()], "not found"),
    "config not json": (lambda p: (p / "deltatune.json").write_text("{not json"), "deltatune.json"),
    "config unknown method": (lambda p: edit_json(p, "deltatune.json", lambda d: d["config"].update(method="nope")), "nope"),
    "config negative rank": (lambda p: edit_json(p, "deltatune.json", lambda d: d["config"].update(r=-2)), "r"),
    "config wrong rank": (lambda p: edit_json(p, "deltatune.json", lambda d: d["config"].update(r=3)), "shape"),
    "config not served method": ("ia3", "method 'ia3' cannot be served in a mixed batch"),
    "weights missing": (lambda p: (p / WEIGHTS_FILE).unlink(), WEIGHTS_FILE),
    "weights not safetensors": (lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00\x01garbage" * 10), "safetensors"),
    "weights truncated": (lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:100]), "safetensors"),
    "weights oversized": (lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes() + b" " * (3 << 20)), "limit"),
    "lora_A wrong shape": (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 7)})), "shape [4, 7]"),
    "lora_B wrong shape": (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(5, 4)})), "shape [5, 4]"),
    "lora_B missing": (lambda p: edit_tensors(p, lambda t: remove(t, f"{Q0}.lora_B.weight")), "lacks tensor 'lora_B.weight'"),
    "integer dtype": (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 32, dtype=torch.int32)})), "int32"),
    "NaN values": (lambda p: edit_tensors(p, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((0, 0), float("nan"))), "NaN"),
    "infinite values": (lambda p: edit_tensors(p, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("inf"))), "infinite"),
    "unknown tensor": (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(2)})), "lora_C"),
    "module not served": (lambda p: edit_tensors(p, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)})), "layers.9"),
    "rank above the pool's": (None, "max_rank"),
    "rank mask wrong shape": ("incremental", "lora_rank_mask"),
}


def load_or_fail(pool, name, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        try:
            if pool.request(name):
                return None
        except DeltatuneError as err:  # refused before any read (no such adapter)
            return err
        failed = pool.poll()
        if name in failed:
            return failed[name]
        assert time.time() < deadline, f"{name} neither loaded nor failed"
        time.sleep(0.002)
    return None


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_adapter_fails_alone_and_frees_its_slot(base, tmp_path, case):
    corrupt, expected = CORRUPTIONS[case]
    root = tmp_path / "adapters"
    save_adapter(base, root / "good")
    max_rank = 8
    if corrupt is None:  # a well-formed adapter above the pool's rank limit
        save_adapter(base, root / "bad", r=16, alpha=16)
    elif corrupt == "ia3":
        model = deltatune.attach(base, {"method": "ia3", "targets": ["q_proj"], "feedforward": []})
        model.save_delta(root / "bad")
        model.detach("default")
    elif corrupt == "incremental":
        save_adapter(base, root / "bad", r=4, rank_allocation="incremental", initial_r=2, total_r=8)
        edit_tensors(root / "bad", lambda t: t.update({f"{Q0}.lora_rank_mask": torch.ones(3)}))
    else:
        save_adapter(base, root / "bad")
        corrupt(root / "bad")
    pool = AdapterPool(root, served_weights(base), num_slots=1, max_rank=max_rank)
    for _ in range(2):  # a retry reads the file again and fails the same way: nothing was left behind
        err = load_or_fail(pool, "bad")
        assert isinstance(err, DeltatuneError), f"{case}: loaded a corrupt adapter"
        message = str(err)
        assert expected in message and "\n" not in message, message
        assert str(tmp_path) not in message, f"{case}: the message reveals the server's path: {message}"
        assert pool.resident == {} and pool.free == [0] and pool.pending() == 0
    assert load_or_fail(pool, "good") is None and pool.resident == {"good": 0}


def test_served_factors_equal_each_lora_variants_delta_weight(base, tmp_path):
    """PiSSA (rank 2r), rsLoRA and incremental LoRA: the pool's B·s @ A is the branch's own delta_weight()."""
    from deltatune.serve.adapter_pool import read_adapter

    variants = {"pissa": {"init": "pissa"}, "rslora": {"rslora": True},
                "incremental": {"rank_allocation": "incremental", "initial_r": 2, "total_r": 10}}
    for name, extra in variants.items():
        model = deltatune.attach(base, {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], **extra})
        randomize_delta(model, std=0.3)
        model.save_delta(tmp_path / name)
        branches = {m: w.deltas["default"] for m, w in iter_wrappers(model.base_model) if "default" in w.deltas}
        bases = {m: w.base_layer for m, w in iter_wrappers(model.base_model) if "default" in w.deltas}
        model.detach("default")
        prepared = read_adapter(tmp_path / name, served_weights(base), max_rank=8)
        assert set(prepared) == set(branches)
        for module, (a, b_scaled) in prepared.items():
            expected = branches[module].delta_weight(bases[module])
            assert (b_scaled @ a - expected).abs().max() < 1e-5, (name, module)
