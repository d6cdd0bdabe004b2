"""(IA)³ files round-trip with PEFT on tiny llama and BERT models."""
import pytest
import torch

import deltatune
from tests.helpers import randomize_delta, tiny_bert_config, tiny_llama_config

peft = pytest.importorskip("peft")


def fresh(kind):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    return (LlamaForCausalLM(tiny_llama_config()) if kind == "llama" else BertForSequenceClassification(tiny_bert_config())).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_ia3_both_ways(kind, tmp_path):
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = deltatune.attach(fresh(kind), {"method": "ia3"})
    randomize_delta(model, std=0.5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # scales around 1
    ours = logits(model, ids)
    model.save_delta(tmp_path / "d")
    theirs = logits(peft.PeftModel.from_pretrained(fresh(kind), str(tmp_path / "d")).eval(), ids)
    assert (ours - theirs).abs().max() < 1e-5

    targets = {"llama": ["k_proj", "v_proj", "down_proj"], "bert": ["key", "value", "output.dense"]}[kind]
    ff = {"llama": ["down_proj"], "bert": ["output.dense"]}[kind]
    peft_model = peft.get_peft_model(fresh(kind), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "p"))
    loaded = deltatune.load_delta(fresh(kind), tmp_path / "p")
    assert (logits(loaded, ids) - expected).abs().max() < 1e-5
    loaded.merge()
    assert (logits(loaded, ids) - expected).abs().max() < 1e-5
