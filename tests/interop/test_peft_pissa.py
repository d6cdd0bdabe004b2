"""PiSSA (and incremental-rank) LoRA files round-trip with Hugging Face PEFT."""
import json

import pytest
import torch

import deltatune
from tests.helpers import randomize_delta, tiny_llama_config

peft = pytest.importorskip("peft")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def peft_key(key: str) -> str:
    """deltatune's ``<module>.lora_A.weight`` → PEFT's in-memory ``base_model.model.<module>.lora_A.default.weight``."""
    return "base_model.model." + key.replace(".weight", ".default.weight")


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_pissa_init_equals_peft(ids):
    ours = deltatune.attach(tiny(), {"method": "lora", "init": "pissa", "r": 4, "alpha": 8})
    theirs = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")).eval()
    state = dict(theirs.named_parameters())
    for key, value in ours.delta_state_dict().items():
        assert torch.allclose(value, state[peft_key(key)], atol=1e-6), key
    # same trained values → same function (PEFT holds W_res in the base weight, deltatune W and B₀A₀)
    randomize_delta(ours, std=0.1)
    with torch.no_grad():
        for key, value in ours.delta_state_dict().items():
            state[peft_key(key)].copy_(value)
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() < 1e-5


def test_deltatune_pissa_file_loads_in_peft(ids, tmp_path):
    model = deltatune.attach(tiny(), {"method": "lora", "init": "pissa", "r": 4, "targets": ["q_proj", "v_proj", "down_proj"]})
    randomize_delta(model, std=0.1)
    ours = logits(model, ids)
    model.save_delta(tmp_path / "d")
    loaded = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "d")).eval()
    assert (logits(loaded, ids) - ours).abs().max() < 1e-5
    with loaded.disable_adapter():
        assert (logits(loaded, ids) - ours).abs().max() > 1e-3


def test_converted_pissa_loads_in_peft_as_plain_lora(ids, tmp_path):
    from deltatune.methods.lora_init import pissa_to_lora

    model = deltatune.attach(tiny(), {"method": "lora", "init": "pissa", "r": 4})
    randomize_delta(model, std=0.1)
    ours = logits(model, ids)
    model.save_delta(tmp_path / "d", pissa_to_lora(model))
    loaded = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "d")).eval()
    assert loaded.peft_config["default"].init_lora_weights is True and loaded.peft_config["default"].r == 8
    assert (logits(loaded, ids) - ours).abs().max() < 1e-5


def test_peft_pissa_files_load_in_deltatune(ids, tmp_path):
    """Both PEFT forms: the PiSSA adapter itself, and PEFT's conversion to a plain rank-2r LoRA."""
    theirs = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion reference
    theirs.save_pretrained(str(tmp_path / "init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize_delta(theirs, std=0.1, seed=5)
    expected = logits(theirs.eval(), ids)
    theirs.save_pretrained(str(tmp_path / "pissa"))
    theirs.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    model = deltatune.load_delta(tiny(), tmp_path / "pissa")
    assert model.delta_configs["default"].init == "pissa"
    assert (logits(model, ids) - expected).abs().max() < 1e-5

    converted = deltatune.load_delta(tiny(), tmp_path / "lora")
    assert converted.delta_configs["default"].init == "kaiming" and converted.delta_configs["default"].r == 8
    assert (logits(converted, ids) - expected).abs().max() < 1e-5


def test_incremental_file_loads_in_peft(ids, tmp_path):
    """Inactive ranks have zero B columns, so PEFT's plain rank-r LoRA gives the same logits."""
    model = deltatune.attach(tiny(), {"method": "lora", "rank_allocation": "incremental", "r": 4, "initial_r": 2})
    with torch.no_grad():
        for name, p in model.delta_parameters().items():
            if name.endswith("lora_B.weight"):
                p[:, :2].normal_(0, 0.1)  # train the two active ranks only
    ours = logits(model, ids)
    model.save_delta(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["r"] == 4
    loaded = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "d")).eval()
    assert (logits(loaded, ids) - ours).abs().max() < 1e-5
    assert (ours - logits(tiny(), ids)).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_pissa_roundtrip_with_peft(tmp_path):
    tokenizer = deltatune.load_tokenizer("smollm2-135m-instruct")
    enc = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")
    # Four layers keep the SVDs (ours at attach, PEFT's at load) cheap on a busy CPU.
    targets = [r"re:model\.layers\.[0-3]\.self_attn\.(q|v)_proj"]
    base = deltatune.load_model("smollm2-135m-instruct")
    with torch.no_grad():
        plain = base(**enc).logits
    model = deltatune.attach(base, {"method": "lora", "init": "pissa", "r": 8, "targets": targets})
    assert len(model.delta_targets["default"]) == 8
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, plain), "unchanged at attach time on the real model"
    randomize_delta(model, std=0.01)
    with torch.no_grad():
        ours = model(**enc).logits
    model.save_delta(tmp_path / "d")
    loaded = peft.PeftModel.from_pretrained(deltatune.load_model("smollm2-135m-instruct"), str(tmp_path / "d")).eval()
    with torch.no_grad():
        theirs = loaded(**enc).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert (ours - plain).abs().max().item() > 1e-2
