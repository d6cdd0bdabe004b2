import pytest
import torch

import deltatune
from deltatune.core.inject import DeltaWrapper
from deltatune.utils.errors import ConfigError, DeltatuneError
from tests.helpers import randomize_delta


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_attach_freezes_base_and_counts(tiny_llama):
    model = deltatune.attach(tiny_llama, deltatune.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads x 8); per layer r*(in+out) each.
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    report = model.parameter_report()
    assert report["trainable"] == expected == report["per_delta"]["default"]
    assert report["total"] == sum(p.numel() for p in tiny_llama.parameters())


def test_dict_config_and_call_like_base(tiny_llama, input_ids):
    ref = logits(tiny_llama, input_ids)
    model = deltatune.attach(tiny_llama, {"method": "lora", "r": 8, "targets": ["q_proj", "v_proj"]})
    out = model(input_ids=input_ids)
    assert torch.equal(out.logits, ref)  # B = 0 at init: unchanged
    assert model.config is tiny_llama.config


def test_unknown_config_key(tiny_llama):
    with pytest.raises(ConfigError, match=r"unknown key 'delta.rank' \(did you mean 'rank_pattern'\?\); valid keys: .*\br\b"):
        deltatune.attach(tiny_llama, {"method": "lora", "rank": 8})
    with pytest.raises(ConfigError, match=r"unknown delta method 'lorra' \(did you mean 'lora'\?\)"):
        deltatune.attach(tiny_llama, {"method": "lorra"})
    with pytest.raises(ConfigError, match=r"delta.r"):
        deltatune.attach(tiny_llama, {"method": "lora", "r": 0})


def test_disable_and_set_active(tiny_llama, input_ids):
    ref = logits(tiny_llama, input_ids)
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "all-linear"}, name="a")
    randomize_delta(model, seed=1)
    out_a = logits(model, input_ids)
    assert (out_a - ref).abs().max() > 1e-3
    with model.disable():
        assert torch.equal(logits(model, input_ids), ref)
    model.attach({"method": "lora", "targets": "all-linear"}, name="b")
    assert model.active == ["b"]
    randomize_delta(model, seed=2)  # only b is trainable now
    out_b = logits(model, input_ids)
    model.set_active(["a"])
    assert torch.allclose(logits(model, input_ids), out_a, atol=1e-6)
    model.set_active(["a", "b"])
    both = logits(model, input_ids)
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)


def test_merge_unmerge_roundtrip(tiny_llama, input_ids):
    model = deltatune.attach(tiny_llama, deltatune.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_delta(model)
    before = logits(model, input_ids)
    weights_before = {n: p.clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    model.merge()
    assert (logits(model, input_ids) - before).abs().max() < 1e-5
    with pytest.raises(DeltatuneError, match="unmerge"):
        model.set_active([])
    model.unmerge()
    assert (logits(model, input_ids) - before).abs().max() < 1e-5
    for n, p in tiny_llama.named_parameters():
        if n in weights_before:
            assert (p - weights_before[n]).abs().max() < 1e-6


def test_safe_merge_refuses_nan(tiny_llama):
    model = deltatune.attach(tiny_llama, deltatune.LoraConfig(r=2, targets="q_proj"))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    with pytest.raises(DeltatuneError, match="NaN/inf"):
        model.merge(safe=True)


def test_unload_restores_original_tree(tiny_llama):
    keys = list(tiny_llama.state_dict())
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "all-linear", "modules_to_save": ["lm_head"]})
    assert any(isinstance(m, DeltaWrapper) for m in tiny_llama.modules())
    base = model.unload()
    assert base is tiny_llama
    assert list(base.state_dict()) == keys
    assert not any(isinstance(m, DeltaWrapper) for m in base.modules())


def test_modules_to_save_trains_a_copy(tiny_bert_cls):
    ids = torch.randint(0, 128, (2, 8))
    model = deltatune.attach(tiny_bert_cls, {"method": "lora", "targets": ["query", "value"], "modules_to_save": ["classifier"]})
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in names)
    randomize_delta(model, std=0.5)
    before = logits(model, ids)
    model.merge()
    assert (logits(model, ids) - before).abs().max() < 1e-5
    model.unmerge()
    assert (logits(model, ids) - before).abs().max() < 1e-5


def test_generate_through_facade(tiny_llama, input_ids):
    model = deltatune.attach(tiny_llama, {"method": "lora", "targets": "all-linear"})
    out = model.generate(input_ids=input_ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


def test_list_methods():
    assert "lora" in deltatune.list_methods()


def test_lora_forward_and_grads_match_naive_formula():
    """y = x Wᵀ + b + s · x Aᵀ Bᵀ, and its gradients, against plain PyTorch."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(4, 6, requires_grad=True)
    model = deltatune.attach(base, {"method": "lora", "r": 3, "alpha": 6, "targets": "0"})
    randomize_delta(model, std=0.3)
    branch = model.base_model[0].deltas["default"]
    A, B, W, b = branch.lora_A.weight, branch.lora_B.weight, base[0].base_layer.weight, base[0].base_layer.bias
    y = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    A_ref, B_ref = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    y_ref = x_ref @ W.T + b + 2.0 * (x_ref @ A_ref.T @ B_ref.T)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(A.grad, A_ref.grad)
    torch.testing.assert_close(B.grad, B_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert W.grad is None  # the base stays frozen
