import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.utils.errors import DeltaFileError, ShapeMismatchError
from tests.helpers import randomize_delta, tiny_llama_config


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_load_identical(tiny_llama, input_ids, tmp_path):
    from transformers import LlamaForCausalLM

    model = deltatune.attach(tiny_llama, deltatune.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rslora=True))
    randomize_delta(model)
    out = logits(model, input_ids)
    model.save_delta(tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "deltatune.json"]
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    keys = set(load_file(tmp_path / "d" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8

    torch.manual_seed(0)
    fresh = LlamaForCausalLM(tiny_llama_config()).eval()
    loaded = deltatune.load_delta(fresh, tmp_path / "d")
    assert torch.equal(logits(loaded, input_ids), out)
    assert loaded.delta_configs["default"].rslora is True


def test_load_twice_gets_new_name(tiny_llama, tmp_path):
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"})
    model.save_delta(tmp_path / "ad")
    again = deltatune.load_delta(tiny_llama, tmp_path / "ad")
    assert again is model and sorted(model.delta_configs) == ["ad", "default"] and model.active == ["ad"]


def test_save_overwrites_atomically(tiny_llama, tmp_path, monkeypatch):
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"})
    randomize_delta(model, seed=1)
    model.save_delta(tmp_path / "d")
    saved = {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()}
    randomize_delta(model, seed=2)
    write_text = Path.write_text

    def disk_full_in_last_file(path, text, *args, **kwargs):
        if path.name == "deltatune.json":  # the last file of a save: the new weights are written by now
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_in_last_file)
    with pytest.raises(OSError, match="No space left on device"):
        model.save_delta(tmp_path / "d")
    monkeypatch.undo()
    # The failed save left the previous delta byte for byte, and no temporary files beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()} == saved
    model.save_delta(tmp_path / "d")  # a save that completes replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (tmp_path / "d" / "adapter_model.safetensors").read_bytes() != saved["adapter_model.safetensors"]


def test_wrong_base_shape(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"}).save_delta(tmp_path / "d")
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=48, num_attention_heads=4)).eval()
    with pytest.raises(ShapeMismatchError, match=r"lora_A.weight' has shape \[8, 32\], but the model needs \[8, 48\]"):
        deltatune.load_delta(other, tmp_path / "d")
    # the failed load left nothing behind
    assert not any("Delta" in type(m).__name__ for m in other.modules())


def test_wrong_base_missing_module(tiny_llama, tiny_bert_cls, tmp_path):
    deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"}).save_delta(tmp_path / "d")
    with pytest.raises(ShapeMismatchError, match=r"module 'model.layers.0.self_attn.q_proj', which BertForSequenceClassification does not have"):
        deltatune.load_delta(tiny_bert_cls, tmp_path / "d")


def test_corrupt_and_missing_files(tiny_llama, tmp_path):
    deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"}).save_delta(tmp_path / "d")
    weights = tmp_path / "d" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(DeltaFileError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        deltatune.load_delta(tiny_llama, tmp_path / "d")
    weights.unlink()
    (tmp_path / "d" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(DeltaFileError, match="pickle files are refused"):
        deltatune.load_delta(tiny_llama, tmp_path / "d")
    with pytest.raises(DeltaFileError, match="does not exist"):
        deltatune.load_delta(tiny_llama, tmp_path / "nope")
    (tmp_path / "d" / "deltatune.json").write_text("{bad")
    with pytest.raises(DeltaFileError, match=r"deltatune.json: not valid JSON"):
        deltatune.load_delta(tiny_llama, tmp_path / "d")


def test_atomic_dir_restores_the_old_directory_when_the_final_rename_fails(tmp_path, monkeypatch):
    import os

    from deltatune.utils.io import atomic_dir

    target = tmp_path / "d"
    target.mkdir()
    (target / "f").write_text("old")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the temp directory onto the target
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (target / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
