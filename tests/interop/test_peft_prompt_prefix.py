"""Prompt and prefix tuning files round-trip with PEFT (tiny llama; BERT sequence classification).

PEFT's prompt tuning returns logits for the V virtual positions too; deltatune strips them, so
the comparison is on the real tokens' logits (PEFT's ``logits[:, V:]``). A classifier's logits
come from the pooled first position in both, so they are compared whole.
"""
import inspect

import pytest
import torch
from transformers import BertModel

import deltatune
from tests.helpers import randomize_delta, tiny_bert_config, tiny_llama_config

peft = pytest.importorskip("peft")
V = 5


def fresh(kind):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    return (LlamaForCausalLM(tiny_llama_config()) if kind == "llama" else BertForSequenceClassification(tiny_bert_config())).eval()


def logits(model, ids, real_only=False):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out[:, V:] if real_only and out.dim() == 3 and out.shape[1] > ids.shape[1] else out


def peft_config(method, kind):
    task = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=V)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=V)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_both_ways(method, kind, tmp_path):
    if kind == "bert" and method == "prefix_tuning" and "past_key_values" not in inspect.signature(BertModel.forward).parameters:
        pytest.skip(f"peer limitation: PEFT {peft.__version__} runs sequence-classification prefix tuning only on a backbone "
                    "whose forward names 'past_key_values'; transformers >= 5.25 calls it 'cache'")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    config = {"method": method, "num_virtual_tokens": V}
    if kind == "bert":  # PEFT's sequence-classification model expects the trained head in the file
        config["modules_to_save"] = ["classifier"]
    model = deltatune.attach(fresh(kind), config)
    randomize_delta(model, std=0.5)
    ours = logits(model, ids)
    assert ours.shape[:2] == ((2, 7) if kind == "llama" else (2, 3))
    model.save_delta(tmp_path / "d")
    theirs = logits(peft.PeftModel.from_pretrained(fresh(kind), str(tmp_path / "d")).eval(), ids, real_only=True)
    assert (ours - theirs).abs().max() < 1e-5

    peft_model = peft.get_peft_model(fresh(kind), peft_config(method, kind))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn_like(p))
    peft_model.eval()
    expected = logits(peft_model, ids, real_only=True)
    peft_model.save_pretrained(str(tmp_path / "p"))
    loaded = deltatune.load_delta(fresh(kind), tmp_path / "p")
    assert loaded.delta_configs["default"].num_virtual_tokens == V
    assert (logits(loaded, ids) - expected).abs().max() < 1e-5


def test_prefix_projection_folds_to_peft_file(tmp_path):
    """Trained with the MLP, saved folded: PEFT (prefix_projection false) gives the same logits."""
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = deltatune.attach(fresh("llama"), {"method": "prefix_tuning", "num_virtual_tokens": V, "projection_size": 16})
    randomize_delta(model, std=0.5)
    ours = logits(model, ids)
    model.save_delta(tmp_path / "d")
    theirs = logits(peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "d")).eval(), ids)
    assert (ours - theirs).abs().max() < 1e-5
