"""PEFT AdaLoRA files load in deltatune as LoRA with per-module ranks, with PEFT's logits."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.utils.errors import ShapeMismatchError
from tests.helpers import tiny_bert_config, tiny_llama_config

peft = pytest.importorskip("peft")


def tiny_llama(**overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_bert():
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_bert_config()).eval()


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize_triplets(peft_model, rank_pattern, seed=0):
    """Random A, E and (PEFT inits it to zero-effect) B, then E zeroed where rank_pattern prunes."""
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if any(f"{part}.default" in name for part in ("lora_A", "lora_B", "lora_E")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.base_model.rankallocator.mask_using_rank_pattern(peft_model.base_model.model, rank_pattern)


def ranks_on_disk(path):
    return {k.removeprefix("base_model.model.").removesuffix(".lora_E"): v.shape[0] for k, v in load_file(str(path / "adapter_model.safetensors")).items() if k.endswith(".lora_E")}


def trained_llama_adalora(ids, path):
    """A tiny llama AdaLoRA trained through PEFT's schedule until the final rank allocation, saved to ``path``."""
    config = peft.AdaLoraConfig(init_r=6, target_r=3, total_step=10, tinit=1, tfinal=2, lora_alpha=16,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(tiny_llama(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(config.total_step - config.tfinal + 1):  # the last step fixes rank_pattern
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    randomize_triplets(model, model.peft_config["default"].rank_pattern)
    reference = output(model, ids)
    model.save_pretrained(str(path))
    return reference


def test_peft_adalora_llama_loads_as_lora_with_peft_logits(ids, tmp_path):
    in_memory = trained_llama_adalora(ids, tmp_path / "ada")
    ranks = ranks_on_disk(tmp_path / "ada")
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 6  # the allocator really gave modules different ranks
    theirs = output(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ada")).eval(), ids)
    assert (theirs - in_memory).abs().max() < 1e-5

    model = deltatune.load_delta(tiny_llama(), tmp_path / "ada")
    config = model.delta_configs["default"]
    assert config.method == "lora" and config.r == 6 and config.alpha == 16
    assert sorted(model.delta_targets["default"]) == sorted(m for m, r in ranks.items() if r > 0)
    state = model.delta_state_dict()
    for module in model.delta_targets["default"]:
        assert state[f"{module}.lora_A.weight"].shape[0] == ranks[module]
    ours = output(model, ids)
    assert (ours - theirs).abs().max() < 1e-5
    with model.disable():
        assert (output(model, ids) - ours).abs().max() > 1e-3  # the delta really changes the output

    # merge: the folded LoRA merges like any other
    model.merge()
    assert (output(model, ids) - theirs).abs().max() < 1e-5
    model.unmerge()


def test_loaded_adalora_saves_as_peft_lora(ids, tmp_path):
    trained_llama_adalora(ids, tmp_path / "ada")
    theirs = output(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ada")).eval(), ids)
    model = deltatune.load_delta(tiny_llama(), tmp_path / "ada")
    model.save_delta(tmp_path / "lora")

    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["rank_pattern"]
    assert all(saved["alpha_pattern"][m] / r == saved["lora_alpha"] / saved["r"] for m, r in saved["rank_pattern"].items())
    as_lora = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")).eval()
    assert (output(as_lora, ids) - theirs).abs().max() < 1e-5
    again = deltatune.load_delta(tiny_llama(), tmp_path / "lora")
    assert (output(again, ids) - theirs).abs().max() < 1e-5


def test_adalora_serves_from_the_adapter_pool(ids, tmp_path):
    from deltatune.core.inject import iter_wrappers
    from deltatune.serve.adapter_pool import read_adapter

    trained_llama_adalora(ids, tmp_path / "ada")
    model = deltatune.load_delta(tiny_llama(), tmp_path / "ada")

    branches = {m: w.deltas["default"] for m, w in iter_wrappers(model.base_model) if "default" in w.deltas}
    weights = {m: w.base_layer.weight for m, w in iter_wrappers(model.base_model) if m in branches}
    prepared = read_adapter(tmp_path / "ada", weights, max_rank=6)
    assert set(prepared) == set(branches)
    for m, (a, b_scaled) in prepared.items():
        assert torch.allclose(b_scaled @ a, branches[m].delta_weight(None), atol=1e-6), m


def test_peft_adalora_bert_with_pruned_modules(ids, tmp_path):
    """rank_pattern set by hand: one module keeps all 4 ranks, one 2, one none, the rest 3."""
    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["query", "value", "dense"])
    model = peft.get_peft_model(tiny_bert(), config)
    names = sorted({n.split(".lora_E")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_E." in n})
    pattern = {f"{n}.lora_E": [True, False, True, True] for n in names}
    pattern[f"{names[0]}.lora_E"] = [True] * 4
    pattern[f"{names[1]}.lora_E"] = [False, True, False, True]
    pattern[f"{names[2]}.lora_E"] = [False] * 4
    model.peft_config["default"].rank_pattern = pattern
    randomize_triplets(model, pattern, seed=2)
    model.eval()
    in_memory = output(model, ids)
    model.save_pretrained(str(tmp_path / "ada"))
    assert ranks_on_disk(tmp_path / "ada")[names[2]] == 0

    theirs = output(peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "ada")).eval(), ids)
    assert (theirs - in_memory).abs().max() < 1e-5
    ours_model = deltatune.load_delta(tiny_bert(), tmp_path / "ada")
    assert names[2] not in ours_model.delta_targets["default"]  # rank 0: nothing to wrap
    assert len(ours_model.delta_targets["default"]) == len(names) - 1
    ours = output(ours_model, ids)
    assert (ours - theirs).abs().max() < 1e-5
    with ours_model.disable():
        assert (output(ours_model, ids) - ours).abs().max() > 1e-3


def test_adalora_for_another_model_names_module_and_shape(ids, tmp_path):
    trained_llama_adalora(ids, tmp_path / "ada")
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.\d\.[a-z_.]+_proj\.lora_[AB]\.weight' has shape \[\d+, \d+\], but the model needs"):
        deltatune.load_delta(tiny_llama(hidden_size=48, intermediate_size=96), tmp_path / "ada")


def test_inconsistent_adalora_file_names_module_and_shapes(ids, tmp_path):
    trained_llama_adalora(ids, tmp_path / "ada")
    weights = tmp_path / "ada" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_E"
    tensors[key] = torch.ones(tensors[key].shape[0] + 1, 1)
    save_file(tensors, str(weights))
    with pytest.raises(ShapeMismatchError, match=r"AdaLoRA module 'model\.layers\.0\.self_attn\.v_proj' has lora_A \[\d+, 32\], lora_E \[\d+, 1\]"):
        deltatune.load_delta(tiny_llama(), tmp_path / "ada")


def test_merge_reads_adalora_files_like_lora(ids, tmp_path):
    """`deltatune merge` takes a PEFT AdaLoRA directory as an input: task arithmetic with weight 1
    into a full model gives PEFT's logits."""
    from deltatune.algebra.merge import run_merge
    from deltatune.algebra.recipe import MergeRecipe

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    trained_llama_adalora(ids, tmp_path / "ada")
    theirs = output(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ada")).eval(), ids)
    recipe = MergeRecipe.model_validate({"base": str(base), "inputs": [{"path": str(tmp_path / "ada"), "weight": 1.0}],
                                         "method": "task_arithmetic", "output": {"path": str(tmp_path / "merged")}})
    run_merge(recipe)
    merged = deltatune.load_model(str(tmp_path / "merged")).eval()
    assert (output(merged, ids) - theirs).abs().max() < 1e-5
