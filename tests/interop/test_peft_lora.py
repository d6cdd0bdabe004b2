"""LoRA files round-trip with Hugging Face PEFT, on the real SmolLM2-135M-Instruct and on tiny models."""
import pytest
import torch

import deltatune
from tests.helpers import randomize_delta

peft = pytest.importorskip("peft")

PROMPT = "The quick brown fox jumps over the lazy dog because"


def logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def tokenizer():
    return deltatune.load_tokenizer("smollm2-135m-instruct")


def smollm2():
    return deltatune.load_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_deltatune_delta_loads_in_peft(tokenizer, tmp_path):
    enc = tokenizer(PROMPT, return_tensors="pt")
    model = deltatune.attach(smollm2(), deltatune.LoraConfig(r=8, alpha=16, targets="all-linear"))
    randomize_delta(model, std=0.01)
    ours = logits(model, enc)
    model.save_delta(tmp_path / "adapter")

    peft_model = peft.PeftModel.from_pretrained(smollm2(), str(tmp_path / "adapter")).eval()
    theirs = logits(peft_model, enc)
    assert (ours - theirs).abs().max().item() < 1e-4
    with peft_model.disable_adapter():
        plain = logits(peft_model, enc)
    assert (ours - plain).abs().max().item() > 1e-2  # the delta really changes the output


@pytest.mark.slow
def test_peft_adapter_loads_in_deltatune(tokenizer, tmp_path):
    enc = tokenizer(PROMPT, return_tensors="pt")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(smollm2(), config)
    randomize_delta(peft_model, std=0.01)
    peft_model.eval()
    theirs = logits(peft_model, enc)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = deltatune.load_delta(smollm2(), tmp_path / "peft")
    assert model.delta_configs["default"].rslora and model.delta_configs["default"].r == 4
    assert len(model.delta_targets["default"]) == 3 * 30
    ours = logits(model, enc)
    assert (ours - theirs).abs().max().item() < 1e-4
    with model.disable():
        assert (logits(model, enc) - ours).abs().max().item() > 1e-2


def test_tiny_bert_classifier_roundtrip(tiny_bert_cls, tmp_path):
    """modules_to_save (a new classifier head) uses PEFT's key names both ways."""
    from transformers import BertForSequenceClassification

    from tests.helpers import tiny_bert_config

    ids = torch.randint(0, 128, (2, 8))
    model = deltatune.attach(tiny_bert_cls, {"method": "lora", "r": 4, "targets": ["query", "value"], "modules_to_save": ["classifier"]})
    randomize_delta(model, std=0.1)
    ours = logits(model, {"input_ids": ids})
    model.save_delta(tmp_path / "d")
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(tiny_bert_config()).eval()
    theirs = logits(peft.PeftModel.from_pretrained(fresh, str(tmp_path / "d")).eval(), {"input_ids": ids})
    assert (ours - theirs).abs().max() < 1e-5

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(BertForSequenceClassification(tiny_bert_config()), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_delta(peft_model, std=0.1, seed=3)
    peft_model.eval()
    expected = logits(peft_model, {"input_ids": ids})
    peft_model.save_pretrained(str(tmp_path / "p"))
    torch.manual_seed(0)
    loaded = deltatune.load_delta(BertForSequenceClassification(tiny_bert_config()).eval(), tmp_path / "p")
    assert (logits(loaded, {"input_ids": ids}) - expected).abs().max() < 1e-5
