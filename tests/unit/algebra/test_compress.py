"""ComPEFT: packing, density-1 identity, compressed deltas load and merge like any other."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.algebra.compress import compress_adapter, compress_tensor, decompress_tensor, pack_bits, unpack_bits
from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import parse_recipe
from deltatune.utils.errors import ConfigError
from tests.helpers import randomize_delta, save_tiny_lm
from tests.unit.algebra.helpers_algebra import weights

IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    base = save_tiny_lm(root / "base")
    dm = deltatune.attach(deltatune.load_model(base), {"method": "lora", "r": 8, "alpha": 16.0, "targets": "all-linear"})
    randomize_delta(dm, std=0.1, seed=4)
    dm.save_delta(str(root / "lora"))
    return root, base, root / "lora"


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_bit_packing_round_trip():
    bits = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.5
    assert pack_bits(bits).numel() == 5
    assert torch.equal(unpack_bits(pack_bits(bits), 37), bits)


def test_compress_tensor_keeps_top_k_as_sign_times_scale():
    t = torch.tensor([[0.5, -4.0], [3.0, -0.1]])
    packed = compress_tensor(t, 0.5, ternary=True)
    assert packed["scale"].item() == pytest.approx(3.5)              # mean |kept| = (4 + 3) / 2
    assert decompress_tensor(packed, (2, 2)).tolist() == [[0.0, -3.5], [3.5, 0.0]]
    assert torch.equal(decompress_tensor(compress_tensor(t, 1.0, ternary=False), (2, 2)), t)


def test_density_one_without_ternary_is_identity(adapter, tmp_path):
    _, base, lora = adapter
    report = compress_adapter(lora, tmp_path / "c", density=1.0, ternary=False)
    assert report["size_ratio"] > 1.0   # a bitmask on top of every value: no saving, but exact
    want = logits(deltatune.load_delta(deltatune.load_model(base), lora))
    got = deltatune.load_delta(deltatune.load_model(base), tmp_path / "c")
    assert got.delta_configs["default"].method == "compeft"
    assert torch.equal(logits(got), want)


def test_compressed_delta_loads_merges_and_is_small(adapter, tmp_path):
    _, base, lora = adapter
    report = compress_adapter(lora, tmp_path / "c", density=0.1)
    assert report["tensor_bytes_ratio"] < 0.04   # ≈ (1 + 0.1) bits per entry of 32, plus one scale per tensor
    assert report["size_ratio"] < 0.5            # tiny tensors: the file's header (names) is most of it
    dm = deltatune.load_delta(deltatune.load_model(base), tmp_path / "c")
    out = logits(dm)
    dm.merge()
    assert (logits(dm) - out).abs().max() < 1e-5
    dm.unmerge()
    assert (logits(dm) - out).abs().max() < 1e-5
    # … and the merge engine takes it like any other delta (through the method's merge()).
    run_merge(parse_recipe({"base": str(base), "inputs": [{"path": str(tmp_path / "c")}], "method": "task_arithmetic", "output": {"path": str(tmp_path / "m")}}))
    assert (logits(deltatune.load_model(tmp_path / "m")) - out).abs().max() < 1e-4
    merged, b = weights(tmp_path / "m"), weights(base)
    assert merged.keys() == b.keys()  # a full model under the base's own names
    changed = {k for k in b if not torch.equal(merged[k], b[k])}
    assert changed == {k for k in b if k.endswith("_proj.weight")}  # exactly the LoRA's all-linear targets


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_outside_range_is_refused_before_writing(adapter, tmp_path, density):
    _, _, lora = adapter
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        compress_adapter(lora, tmp_path / "c", density=density)
    assert not (tmp_path / "c").exists()


def test_classifier_delta_with_trained_head(tmp_path):
    from transformers import BertForSequenceClassification

    from tests.helpers import tiny_bert_config
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    base.save_pretrained(tmp_path / "base")
    dm = deltatune.attach(base, {"method": "lora", "r": 4, "targets": ["query", "value"], "modules_to_save": ["classifier"]})
    randomize_delta(dm, std=0.1, seed=1)
    dm.save_delta(str(tmp_path / "lora"))
    want = logits(dm)
    compress_adapter(tmp_path / "lora", tmp_path / "c", density=1.0, ternary=False)
    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    got = deltatune.load_delta(fresh, tmp_path / "c")
    assert torch.allclose(logits(got), want, atol=1e-6)   # the head is stored as is, the LoRA factors exactly
