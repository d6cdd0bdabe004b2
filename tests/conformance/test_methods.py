"""Every registered method passes the same contract, on a llama-style and a BERT-style tiny model."""
import pytest
import torch
from torch import nn

import deltatune
from deltatune.core.inject import iter_logical_modules
from deltatune.core.targets import matches
from tests.helpers import randomize_delta


def lora_count(name: str, module: nn.Linear, cfg) -> int:
    return cfg.r * (module.in_features + module.out_features)


def ia3_count(name: str, module: nn.Linear, cfg) -> int:
    return module.in_features if any(matches(p, name) for p in cfg.feedforward) else module.out_features


def features(module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def has_bias(module) -> bool:
    return getattr(module, "bias", None) is not None


# method → trainable parameters for one wrapped module. A new method adds its formula here.
PARAM_FORMULAS = {
    "lora": lora_count,
    "ia3": ia3_count,
    "ssf": lambda name, m, cfg: 2 * features(m),
    "bitfit": lambda name, m, cfg: features(m),
    "norm_tuning": lambda name, m, cfg: features(m) * (2 if has_bias(m) else 1),
}
def bottleneck_count(name: str, module, cfg) -> int:
    from deltatune.methods.bottleneck import block_features

    d_in, d_out = block_features(module)
    z = d_in if cfg.placement == "parallel" else d_out
    return z * cfg.size + cfg.size + cfg.size * d_out + d_out


PARAM_FORMULAS["bottleneck"] = bottleneck_count

_COMPACTER_SEEN: dict[int, object] = {}  # config id → config (kept alive so ids are not reused)


def compacter_count(name: str, module, cfg) -> int:
    """Own PHM parameters k·(in + out) + out per layer; the two shared n³ rules once per delta."""
    from deltatune.methods.bottleneck import block_features

    d_in, d_out = block_features(module)
    z = d_in if cfg.placement == "parallel" else d_out
    own = cfg.phm_rank * (z + cfg.size) + cfg.size + cfg.phm_rank * (cfg.size + d_out) + d_out
    first = id(cfg) not in _COMPACTER_SEEN
    _COMPACTER_SEEN[id(cfg)] = cfg
    return own + (2 * cfg.phm_dim**3 if first or not cfg.shared_phm_rule else 0)


PARAM_FORMULAS["compacter"] = compacter_count
PARAM_FORMULAS["lofit"] = lambda name, m, cfg: m.in_features if cfg.stage == "scale" else len(cfg.heads[name]) * m.in_features // cfg.num_heads
PARAM_FORMULAS["compeft"] = lambda name, m, cfg: lora_count(name, m, cfg.inner_config())  # packed values of its inner delta (LoRA by default)

# Model-level methods (prefix/prompt tuning) wrap the backbone: their formula reads its config.
def prompt_count(name: str, backbone, cfg) -> int:
    return cfg.num_virtual_tokens * backbone.get_input_embeddings().weight.shape[1]


def prefix_count(name: str, backbone, cfg) -> int:
    from deltatune.methods.prefix import prefix_numel

    return prefix_numel(backbone.config, cfg)


def bundle_count(name: str, module, cfg) -> int:
    """The members' own formulas, for the members that wrap this module."""
    return sum(PARAM_FORMULAS[sub.method](name, module, sub) for sub in cfg.deltas.values() if name in sub.targets)


PARAM_FORMULAS.update({"prompt_tuning": prompt_count, "prefix_tuning": prefix_count, "bundle": bundle_count})

# Sparse deltas (one value per kept entry, k = ⌊density·out·in⌋), DSEE (LoRA + sparse), HFT (a dense ΔW per matrix).
def sparse_count(name: str, m, cfg) -> int:
    from deltatune.methods.sparse_core import budget

    return budget(m.weight.numel(), cfg.density)


PARAM_FORMULAS.update({"lt_sft": sparse_count, "sparse_dynamic": sparse_count, "lift": sparse_count, "hft": lambda name, m, cfg: m.weight.numel(),
                       "dsee": lambda name, m, cfg: sparse_count(name, m, cfg) + cfg.r * (m.in_features + m.out_features)})

# (method, model) pairs that must refuse to attach, with the reason the error must give.
ATTACH_ERRORS = {("bitfit", "tiny_llama"): "has no module with a bias"}
METHODS = deltatune.list_methods()
MODELS = ["tiny_llama", "tiny_bert_cls"]


def run(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def batch():
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_contract(method, model_name, batch, request, tmp_path):
    base = request.getfixturevalue(model_name)
    spec = deltatune.get_method(method)
    ref = run(base, batch)
    if (method, model_name) in ATTACH_ERRORS:
        with pytest.raises(deltatune.DeltatuneError, match=ATTACH_ERRORS[method, model_name]):
            deltatune.attach(base, {"method": method})
        return
    model = deltatune.attach(base, {"method": method})
    cfg = model.delta_configs["default"]

    if spec.capabilities.unchanged_at_init:
        assert torch.equal(run(model, batch), ref), "output changed at init"

    assert method in PARAM_FORMULAS, f"add the parameter formula of {method!r} to PARAM_FORMULAS"
    targets = model.delta_targets["default"]
    modules = dict(iter_logical_modules(base))  # logical names: a bundle nests wrappers (backbone ⊃ mlp)
    expected = sum(PARAM_FORMULAS[method](t, modules[t], cfg) for t in targets)
    assert model.parameter_report()["trainable"] == expected

    randomize_delta(model, std=0.2)
    out = run(model, batch)
    assert (out - ref).abs().max() > 1e-5, "a non-zero delta must change the output"

    model.save_delta(tmp_path / "d")
    fresh = request.getfixturevalue(model_name).__class__(base.config).eval()
    fresh.load_state_dict({k: v for k, v in model.unload().state_dict().items()})
    assert torch.equal(run(deltatune.load_delta(fresh, tmp_path / "d"), batch), out)

    if spec.capabilities.mergeable:
        loaded = deltatune.DeltaModel.of(fresh)
        loaded.merge()
        assert (run(loaded, batch) - out).abs().max() < 1e-5
        loaded.unmerge()
        assert (run(loaded, batch) - out).abs().max() < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_bad_target_is_clear(method, tiny_llama):
    with pytest.raises(deltatune.DeltatuneError, match="closest module names"):
        deltatune.attach(tiny_llama, {"method": method, "targets": ["no_such_proj"]})
