"""Compacter / Compacter++: PHM adapters with shared slow weights and low-rank fast weights."""
import pytest
import torch
from safetensors import safe_open

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.methods.compacter import CompacterBranch, phm_weight
from deltatune.utils.errors import DeltatuneError, TargetError
from tests.helpers import randomize_delta


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def branches(model, name="default"):
    return {m: w.deltas[name] for m, w in iter_wrappers(model.base_model) if name in w.deltas}


def test_phm_weight_matches_kronecker_reference():
    g = torch.Generator().manual_seed(0)
    rule, left, right = torch.randn(4, 4, 4, generator=g), torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, 5, generator=g)
    naive = sum(torch.kron(rule[i], left[i] @ right[i]) for i in range(4))
    assert phm_weight(rule, left, right).shape == (12, 20)
    assert torch.allclose(phm_weight(rule, left, right), naive, atol=1e-6)


@pytest.mark.parametrize("model_name,variant,leaves", [
    ("tiny_llama", "compacter", {"o_proj", "down_proj"}),
    ("tiny_llama", "compacter++", {"down_proj"}),
    ("tiny_bert_cls", "compacter", {"attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"}),
    ("tiny_bert_cls", "compacter++", {"layer.0.output.dense", "layer.1.output.dense"}),
])
def test_compacter_contract(model_name, variant, leaves, input_ids, request, tmp_path):
    base = request.getfixturevalue(model_name)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ref = logits(base, input_ids)
    model = deltatune.attach(base, {"method": "compacter", "variant": variant, "size": 8, "phm_dim": 4, "phm_rank": 2})
    assert torch.equal(logits(model, input_ids), ref), "the up projection starts at zero"
    named = branches(model)
    assert all(any(m.endswith(leaf) for leaf in leaves) for m in named) and len(named) == (4 if variant == "compacter" else 2)
    # one set of slow weights for the whole delta, registered on the first branch only
    rules = {id(b.adapter_down.rules) for b in named.values()}
    assert len(rules) == 1
    first = next(iter(named.values()))
    assert [n for n, _ in first.named_parameters() if "rule" in n] == ["rules.phm_rule_down", "rules.phm_rule_up"]
    # parameters: k·(in + out) + out per PHM layer (hidden 32, size 8, k 2), plus 2 · 4³ shared once
    per_module = 2 * (32 + 8) + 8 + 2 * (8 + 32) + 32
    assert model.parameter_report()["trainable"] == len(named) * per_module + 2 * 4**3

    randomize_delta(model, std=0.3)
    out = logits(model, input_ids)
    assert (out - ref).abs().max() > 1e-5
    # the shared rule gets gradient from every layer's adapter
    logits_grad = model(input_ids=input_ids).logits.sum()
    logits_grad.backward()
    assert first.rules.phm_rule_down.grad is not None and first.rules.phm_rule_down.grad.abs().sum() > 0

    model.save_delta(tmp_path / "d")
    with safe_open(str(tmp_path / "d" / "adapter_model.safetensors"), "pt") as f:
        assert sum("phm_rule_down" in k for k in f.keys()) == 1
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        model.merge()
    fresh = type(base)(base.config).eval()
    fresh.load_state_dict(original)
    loaded = deltatune.load_delta(fresh, tmp_path / "d")
    assert torch.equal(logits(loaded, input_ids), out)
    assert len({id(b.adapter_down.rules) for b in branches(loaded).values()}) == 1


def test_parallel_and_unshared(tiny_llama, input_ids):
    ref = logits(tiny_llama, input_ids)
    model = deltatune.attach(tiny_llama, {"method": "compacter", "placement": "parallel", "targets": ["mlp"], "size": 8, "shared_phm_rule": False})
    assert torch.equal(logits(model, input_ids), ref)
    named = branches(model)
    assert all(isinstance(b, CompacterBranch) for b in named.values())
    assert len({id(b.adapter_down.rules) for b in named.values()}) == 2  # one rule set per adapter
    per_module = 1 * (32 + 8) + 8 + 1 * (8 + 32) + 32 + 2 * 4**3
    assert model.parameter_report()["trainable"] == 2 * per_module


def test_two_attaches_do_not_share_rules(tiny_llama, tiny_bert_cls):
    a = deltatune.attach(tiny_llama, {"method": "compacter", "size": 8}, name="a")
    b = deltatune.attach(tiny_bert_cls, {"method": "compacter", "size": 8}, name="b")
    ra = {id(x.adapter_down.rules) for x in branches(a, "a").values()}
    rb = {id(x.adapter_down.rules) for x in branches(b, "b").values()}
    assert len(ra) == len(rb) == 1 and ra != rb


def test_phm_dim_must_divide(tiny_llama):
    with pytest.raises(TargetError, match=r"phm_dim=3 must divide the output features of 'model.layers.0.self_attn.o_proj' \(32\)"):
        deltatune.attach(tiny_llama, {"method": "compacter", "phm_dim": 3, "size": 9})
    assert not list(iter_wrappers(tiny_llama))


@pytest.mark.slow
@pytest.mark.parametrize("config", [{"method": "compacter"}, {"method": "compacter", "variant": "compacter++"}, {"method": "lofit"}])
def test_defaults_on_minilm(config):
    """The real MiniLM-L6 classifier: default targets resolve, the model is unchanged at attach time."""
    base = deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = logits(base, ids)
    model = deltatune.attach(base, config)
    assert len(model.delta_targets["default"]) == {"compacter": 12, "compacter++": 6, "lofit": 6}[config.get("variant", config["method"])]
    assert torch.equal(logits(model, ids), ref)
