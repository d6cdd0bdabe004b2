"""Failures leave the model as it was: merges, loads and config errors (regressions from review)."""
import json

import pytest
import torch

import deltatune
from deltatune.utils.errors import ConfigError, DeltaFileError, DeltatuneError, ShapeMismatchError
from tests.helpers import randomize_delta, tiny_llama_config


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_failed_safe_merge_changes_nothing(tiny_llama):
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": ["q_proj", "v_proj"]})
    randomize_delta(model)
    with torch.no_grad():
        model.base_model.model.layers[1].self_attn.v_proj.deltas["default"].lora_B.weight.fill_(float("inf"))
    before = weights(tiny_llama)
    with pytest.raises(DeltatuneError, match="NaN/inf"):
        model.merge(safe=True)
    assert model.merged == [] and all(torch.equal(before[n], p) for n, p in weights(tiny_llama).items())
    model.detach("default")  # nothing is left half-merged


def test_zero_scale_refused_before_any_change(tiny_llama):
    model = deltatune.attach(tiny_llama, {"method": "ia3"})
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = 0.0
    before = weights(tiny_llama)
    with pytest.raises(DeltatuneError, match="exactly 0"):
        model.merge()
    assert model.merged == [] and all(torch.equal(before[n], p) for n, p in weights(tiny_llama).items())


def test_merge_order_must_follow_attach_order(tiny_llama, input_ids):
    model = deltatune.attach(tiny_llama, {"method": "ia3", "targets": ["v_proj"], "feedforward": []}, name="scale")
    model.attach({"method": "lora", "targets": ["v_proj"]}, name="low")
    model.set_active(["scale", "low"])
    randomize_delta(model, std=0.2)
    with pytest.raises(DeltatuneError, match="'scale' is applied before it"):
        model.merge(["low"])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.merge(["low", "scale"])  # merged in attach order whatever the order asked
    with torch.no_grad():
        assert (model(input_ids=input_ids).logits - expected).abs().max() < 1e-5


def test_failed_load_keeps_previous_delta_active_and_trainable(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(tiny_llama_config(hidden_size=48)).eval()
    deltatune.attach(other, {"method": "lora", "targets": "q_proj"}).save_delta(tmp_path / "other")
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"}, name="keep")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ShapeMismatchError):
        deltatune.load_delta(tiny_llama, tmp_path / "other")
    assert model.active == ["keep"] and sorted(model.delta_configs) == ["keep"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_ssf_on_rmsnorm_has_no_unmergeable_shift(tiny_llama, input_ids):
    model = deltatune.attach(tiny_llama, {"method": "ssf", "targets": ["input_layernorm"]})
    assert all(k.endswith(".scale") for k in model.delta_state_dict())
    randomize_delta(model, std=0.3)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        model.merge()
        assert (model(input_ids=input_ids).logits - before).abs().max() < 1e-5


def test_target_inside_modules_to_save_is_refused(tiny_bert_cls):
    with pytest.raises(ConfigError, match="modules_to_save"):
        deltatune.attach(tiny_bert_cls, {"method": "lora", "targets": ["bert.pooler.dense"], "modules_to_save": ["bert.pooler"]})


def test_bad_peft_config_is_a_clear_error(tiny_llama, tmp_path):
    deltatune.attach(tiny_llama, {"method": "lora", "targets": "q_proj"}).save_delta(tmp_path / "d")
    (tmp_path / "d" / "deltatune.json").unlink()
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    del cfg["r"]
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeltaFileError, match=r"adapter_config.json: invalid LORA config \(KeyError: 'r'\)"):
        deltatune.load_delta(tiny_llama, tmp_path / "d")


def test_default_targets_give_way_to_modules_to_save(tiny_bert_cls):
    """BitFit's defaults (every module with a bias) include the classifier; with the classifier in
    modules_to_save it is trained in full instead of refusing the attach (explicit targets still refuse)."""
    model = deltatune.attach(tiny_bert_cls, {"method": "bitfit", "modules_to_save": ["classifier"]})
    targets = model.delta_targets["default"]
    assert "classifier" in targets and "bert.pooler.dense" in targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".classifier." in n for n in trainable) and any(".pooler." in n for n in trainable)
