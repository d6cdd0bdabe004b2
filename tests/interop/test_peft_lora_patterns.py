"""PEFT LoRA files with per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``) load in
deltatune with PEFT's logits, merge, save back, and feed `deltatune merge`."""
import json

import pytest
import torch

import deltatune
from deltatune.core.state import converted_on_read
from deltatune.utils.errors import DeltaFileError
from tests.helpers import tiny_llama_config

peft = pytest.importorskip("peft")


def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def peft_lora_with_patterns(path, rslora=False):
    """A PEFT LoRA with q_proj at rank 2, layer 1's v_proj at rank 6 and alpha 3, the rest rank 4 /
    alpha 8 — random A and B, saved by PEFT; returns PEFT's logits."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                             rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3.0, "down_proj": 20.0})
    model = peft.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(path))
    return logits(model.eval(), torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_with_rank_and_alpha_patterns_loads_with_peft_logits(ids, tmp_path, rslora):
    theirs = peft_lora_with_patterns(tmp_path / "lora", rslora)
    base = logits(tiny_llama(), ids)
    assert (theirs - base).abs().max() > 1e-2  # the adapter does something
    model = deltatune.load_delta(tiny_llama(), tmp_path / "lora")
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in model.delta_state_dict().items() if k.endswith(".lora_A.weight")}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.v_proj"] == 6
    assert ranks["model.layers.0.self_attn.v_proj"] == 4
    assert (logits(model, ids) - theirs).abs().max() < 1e-5
    model.merge()  # the folded scales merge like any LoRA
    assert (logits(model, ids) - theirs).abs().max() < 1e-5
    model.unmerge()
    # saved back: a PEFT LoRA (our alpha_pattern keeps PEFT's scale) that PEFT reads with the same logits
    model.save_delta(tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
    assert (logits(again, ids) - theirs).abs().max() < 1e-5


def test_merge_reads_peft_lora_with_alpha_pattern_through_the_fold(ids, tmp_path):
    from deltatune.algebra.merge import run_merge
    from deltatune.algebra.recipe import MergeRecipe

    theirs = peft_lora_with_patterns(tmp_path / "lora")
    assert converted_on_read(tmp_path / "lora")  # its B tensors are not deltatune's as stored
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    recipe = MergeRecipe.model_validate({"base": str(base), "inputs": [{"path": str(tmp_path / "lora"), "weight": 1.0}],
                                         "method": "task_arithmetic", "output": {"path": str(tmp_path / "merged")}})
    run_merge(recipe)
    merged = deltatune.load_model(str(tmp_path / "merged")).eval()
    assert (logits(merged, ids) - theirs).abs().max() < 1e-5


def test_bad_alpha_pattern_names_the_key(tmp_path):
    peft_lora_with_patterns(tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["alpha_pattern"] = {"down_proj": "big"}
    config_file.write_text(json.dumps(data))
    with pytest.raises(DeltaFileError, match=r"alpha_pattern\['down_proj'\] = 'big'; expected a positive number"):
        deltatune.load_delta(tiny_llama(), tmp_path / "lora")
