"""Bundles: several deltas attached, trained and saved together as one delta."""
import json

import pytest
import torch
from safetensors import safe_open

import deltatune
from tests.helpers import randomize_delta, tiny_llama_config

V = 4
MAM = {"method": "bundle", "deltas": {"prefix": {"method": "prefix_tuning", "num_virtual_tokens": V},
                                      "adapter": {"method": "bottleneck", "placement": "parallel", "size": 8}}}


def llama(seed=0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mam_members_targets_and_count():
    model = deltatune.attach(llama(), MAM)
    cfg = model.delta_configs["default"]
    assert cfg.deltas["prefix"].targets == ["model"]
    assert cfg.deltas["adapter"].targets == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert model.delta_targets["default"] == ["model", "model.layers.0.mlp", "model.layers.1.mlp"]
    prefix = V * 2 * 2 * 16  # V · layers · (key, value) · kv features
    adapter = 2 * (32 * 8 + 8 + 8 * 32 + 32)  # per FFN: down (in 32 → 8) + up (8 → 32), with biases
    assert model.parameter_report()["trainable"] == prefix + adapter


def test_trained_together_and_saved_as_one(tmp_path, input_ids):
    model = deltatune.attach(llama(), MAM)
    randomize_delta(model, std=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = input_ids[:, :8]
    losses = []
    for _ in range(15):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        grads = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any("prefix.prompt_embeddings" in k for k in grads) and any("adapter.adapter_down" in k for k in grads)
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1

    out = logits(model, input_ids)
    model.save_delta(tmp_path / "d")
    with safe_open(str(tmp_path / "d" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.prefix.prompt_embeddings" in keys
    assert "base_model.model.model.layers.1.mlp.adapter.adapter_up.weight" in keys
    assert len(keys) == 1 + 2 * 4
    own = json.loads((tmp_path / "d" / "deltatune.json").read_text())
    assert sorted(own["config"]["deltas"]) == ["adapter", "prefix"]
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["peft_type"] is None
    loaded = deltatune.load_delta(llama(), tmp_path / "d")
    assert torch.equal(logits(loaded, input_ids), out)


def test_mergeable_members_unchanged_at_init_and_unload(input_ids):
    base = llama()
    keys = list(base.state_dict())
    ref = logits(base, input_ids)
    cfg = {"method": "bundle", "deltas": {"lora": {"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}, "ia3": {"method": "ia3"}}}
    model = deltatune.attach(base, cfg)
    assert torch.equal(logits(model, input_ids), ref)  # LoRA B = 0, (IA)³ scales = 1
    with pytest.raises(deltatune.DeltatuneError, match=r"delta 'default' \(bundle\) cannot be merged"):
        model.merge()
    assert list(model.unload().state_dict()) == keys
    assert torch.equal(logits(base, input_ids), ref)


def test_bundle_exclude_restricts_members():
    model = deltatune.attach(llama(), {**MAM, "exclude": ["model.layers.1.mlp"]})
    assert model.delta_configs["default"].deltas["adapter"].targets == ["model.layers.0.mlp"]


def test_prefix_member_projection_folds_at_save(tmp_path, input_ids):
    cfg = {"method": "bundle", "deltas": {"prefix": {"method": "prefix_tuning", "num_virtual_tokens": V, "projection_size": 8}}}
    model = deltatune.attach(llama(), cfg)
    randomize_delta(model, std=0.3)
    out = logits(model, input_ids)
    model.save_delta(tmp_path / "d")
    own = json.loads((tmp_path / "d" / "deltatune.json").read_text())
    assert own["config"]["deltas"]["prefix"]["projection_size"] is None
    assert torch.equal(logits(deltatune.load_delta(llama(), tmp_path / "d"), input_ids), out)


@pytest.mark.parametrize("deltas, message", [
    ({"inner": {"method": "bundle"}}, "is itself a bundle"),
    ({"a": {"method": "lora", "modules_to_save": ["lm_head"]}}, "set it on the bundle instead"),
    ({"a.b": {"method": "lora"}}, "must be a plain identifier"),
    ({"a": {"method": "lorra"}}, "did you mean 'lora'"),
    ({}, "non-empty mapping"),
])
def test_bad_bundle_configs_are_clear(deltas, message):
    with pytest.raises(deltatune.DeltatuneError, match=message):
        deltatune.attach(llama(), {"method": "bundle", "deltas": deltas})
