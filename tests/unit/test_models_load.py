import os

import numpy as np
import pytest
import torch

import deltatune
from deltatune.models import gguf_cache
from deltatune.models.load import resolve_source
from deltatune.utils.errors import ModelLoadError


@pytest.fixture
def llama_dir(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_local_dir_and_tasks(llama_dir, tiny_llama, input_ids):
    model = deltatune.load_model(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    with torch.no_grad():
        assert torch.allclose(model(input_ids=input_ids).logits, tiny_llama(input_ids=input_ids).logits)
    cls = deltatune.load_model(llama_dir, task="sequence-classification", num_labels=3)
    assert type(cls).__name__ == "LlamaForSequenceClassification" and cls.config.num_labels == 3
    enc = deltatune.load_model(llama_dir, task="encoder")
    assert type(enc).__name__ == "LlamaModel"


def test_missing_path_is_one_line():
    with pytest.raises(ModelLoadError) as err:
        deltatune.load_model("./no/such/model")
    msg = str(err.value)
    assert "'./no/such/model' not found" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match=r"did you mean 'minilm-l6'"):
        deltatune.load_model("minilm-l7")


def test_hub_id_is_recognised_offline():
    assert resolve_source("org/some-model") == ("org/some-model", False)
    with pytest.raises(ModelLoadError, match=r"hub model 'org/some-model'"):
        deltatune.load_model("org/some-model")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        deltatune.load_model(tmp_path)


def test_corrupt_safetensors(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError) as err:
        deltatune.load_model(llama_dir)
    assert str(llama_dir) in str(err.value) and "\n" not in str(err.value)


def test_seq_cls_needs_labels(llama_dir):
    with pytest.raises(ModelLoadError, match="needs num_labels"):
        deltatune.load_model(llama_dir, task="sequence-classification")


def write_gguf(path, arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unsupported_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    write_gguf(path, "rwkv-not-real")
    with pytest.raises(ModelLoadError, match=r"odd.gguf: GGUF architecture 'rwkv-not-real' is not supported; supported: .*llama"):
        deltatune.load_model(path)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_gguf_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    full = tmp_path / "full.gguf"
    write_gguf(full, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:60])
    with pytest.raises(ModelLoadError, match=r"cut.gguf: not a readable GGUF file \(truncated or corrupt\?\)"):
        deltatune.load_model(cut)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="expected a .gguf file or a model directory"):
        deltatune.load_model(path)


def test_cache_key_follows_content(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama")
    first = gguf_cache.cache_entry(path)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    stat = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only content differs
    assert gguf_cache.cache_entry(path) != first
