"""Adapter pool: LRU residency with references, safe names, clear errors, bounded memory for many adapters."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from deltatune.serve.adapter_pool import AdapterNotFoundError, AdapterPool, read_adapter
from deltatune.utils.errors import DeltaFileError, DeltatuneError, ShapeMismatchError

# The served base weights [out, in]: q_proj 8 → 8, down_proj 16 → 8.
WEIGHTS = {"model.layers.0.self_attn.q_proj": torch.randn(8, 8), "model.layers.0.mlp.down_proj": torch.randn(8, 16)}


def _write(dirpath, r=2, module="model.layers.0.self_attn.q_proj", n_in=8, n_out=8, value=1.0, alpha=None):
    dirpath.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha or r, "target_modules": [module.rsplit(".", 1)[1]]}
    (dirpath / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.full((r, n_in), value),
               f"base_model.model.{module}.lora_B.weight": torch.full((n_out, r), value)}, str(dirpath / "adapter_model.safetensors"))


def _load(pool, name, timeout=10.0):
    deadline = time.time() + timeout
    while not pool.request(name):
        failed = pool.poll()
        if name in failed:
            raise failed[name]
        assert time.time() < deadline, f"{name} did not load"
        time.sleep(0.001)
    return pool.resident[name]


def test_reads_peft_files_with_scale_folded_and_padding(tmp_path):
    _write(tmp_path / "a", r=2, value=0.5, alpha=4)  # scale alpha / r = 2
    pool = AdapterPool(tmp_path, WEIGHTS, num_slots=2, max_rank=4)
    slot = _load(pool, "a")
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(pool.A[q][slot, :2], torch.full((2, 8), 0.5)) and torch.equal(pool.A[q][slot, 2:], torch.zeros(2, 8))
    assert torch.equal(pool.Bt[q][slot, :2], torch.full((2, 8), 1.0)) and torch.equal(pool.Bt[q][slot, 2:], torch.zeros(2, 8))
    assert pool.has[q][slot] and not pool.has["model.layers.0.mlp.down_proj"][slot]


def test_lru_eviction_never_evicts_an_adapter_in_use(tmp_path):
    for n in "abc":
        _write(tmp_path / n)
    pool = AdapterPool(tmp_path, WEIGHTS, num_slots=2, max_rank=2)
    _load(pool, "a"), _load(pool, "b")
    held = pool.acquire("a")           # a is in use; b is the least recently used idle one
    _load(pool, "c")
    assert set(pool.resident) == {"a", "c"} and pool.evictions == 1
    held_c = pool.acquire("c")
    pool.request("b")                  # both slots in use: b waits for a slot instead of evicting
    time.sleep(0.05)
    pool.poll()
    assert "b" not in pool.resident and set(pool.resident) == {"a", "c"}
    pool.release(held)
    pool.poll()
    assert set(pool.resident) == {"b", "c"} and pool.resident["b"] == held
    pool.release(held_c)


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../x", "", ".", "missing"])
def test_names_cannot_leave_the_adapters_dir(tmp_path, name):
    (tmp_path / "adapters").mkdir()
    _write(tmp_path / "outside")
    pool = AdapterPool(tmp_path / "adapters", WEIGHTS)
    with pytest.raises(AdapterNotFoundError, match="adapter"):
        pool.path_of(name)


def test_bad_adapters_fail_with_the_reason(tmp_path):
    _write(tmp_path / "big", r=8)
    _write(tmp_path / "wrong", n_in=5)
    _write(tmp_path / "elsewhere", module="model.layers.3.self_attn.q_proj")
    with pytest.raises(ShapeMismatchError, match="rank 8, above the pool's max_rank 4"):
        read_adapter(tmp_path / "big", WEIGHTS, 4)
    with pytest.raises(ShapeMismatchError, match=r"lora_A.weight' has shape \[2, 5\], expected \[2, 8\]"):
        read_adapter(tmp_path / "wrong", WEIGHTS, 4)
    with pytest.raises(DeltatuneError, match="model.layers.3.self_attn.q_proj"):
        read_adapter(tmp_path / "elsewhere", WEIGHTS, 4)
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}))
    with pytest.raises(DeltaFileError, match="method 'ia3' cannot be served"):
        read_adapter(tmp_path / "ia3", WEIGHTS, 4)
    pool = AdapterPool(tmp_path, WEIGHTS, num_slots=1, max_rank=4)
    with pytest.raises(ShapeMismatchError):
        _load(pool, "big")
    assert pool.resident == {} and pool.pending() == 0


def test_a_thousand_adapters_through_four_slots_keep_memory_fixed(tmp_path):
    _write(tmp_path / "a0000")
    for i in range(1, 1000):
        shutil.copytree(tmp_path / "a0000", tmp_path / f"a{i:04d}")
    pool = AdapterPool(tmp_path, WEIGHTS, num_slots=4, max_rank=2)
    before = pool.nbytes()
    assert len(pool.names()) == 1000
    for i in range(1000):
        slot = _load(pool, f"a{i:04d}")
        assert pool.pending() <= pool.num_slots and len(pool.resident) <= 4
        assert 0 <= slot < 4
    assert pool.loads == 1000 and pool.evictions == 996 and pool.nbytes() == before
