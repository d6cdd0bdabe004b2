"""LoRA options: ``init: pissa`` (principal singular vectors, residual frozen) and
``rank_allocation: incremental`` (IncreLoRA-style rank growth under a budget)."""
import json
import textwrap

import pytest
import torch

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.methods.lora_init import pissa_factors, pissa_to_lora
from deltatune.methods.lora_rank import IncrementalLoraBranch, grow_ranks, rank_report
from deltatune.utils.errors import ConfigError
from tests.helpers import randomize_delta, save_tiny_lm


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def branches(model, name="default"):
    return {m: w.deltas[name] for m, w in iter_wrappers(model.base_model) if name in w.deltas}


# --- PiSSA ---

def test_pissa_factors_are_the_top_r_svd():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    a, b = pissa_factors(w, r=3, scaling=2.0)
    u, s, vh = torch.linalg.svd(w)
    naive = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(3))
    assert a.shape == (3, 20) and b.shape == (12, 3)
    assert torch.allclose(2.0 * b @ a, naive, atol=1e-5)
    # what is left for the frozen residual has exactly the remaining singular values
    assert torch.allclose(torch.linalg.svdvals(w - 2.0 * b @ a)[:9], s[3:], atol=1e-5)


@pytest.mark.parametrize("model_name,targets", [("tiny_llama", ["q_proj", "v_proj"]), ("tiny_bert_cls", ["query", "value"])])
def test_pissa_contract(model_name, targets, input_ids, request, tmp_path):
    base = request.getfixturevalue(model_name)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ref = logits(base, input_ids)
    model = deltatune.attach(base, {"method": "lora", "init": "pissa", "r": 4, "alpha": 8})
    assert torch.equal(logits(model, input_ids), ref), "PiSSA must leave the model unchanged at attach time"
    wrapped = branches(model)
    assert sorted(m.rsplit(".", 1)[-1] for m in wrapped) == sorted(targets * 2)
    assert model.parameter_report()["trainable"] == sum(4 * (w.lora_A.weight.shape[1] + w.lora_B.weight.shape[0]) for w in wrapped.values())
    # A, B start on the principal directions: s·B A is the best rank-4 approximation of W
    name, branch = next(iter(wrapped.items()))
    w = dict(base.named_modules())[name + ".base_layer"].weight
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.svdvals(branch.scaling * branch.lora_B.weight @ branch.lora_A.weight)[:4], s[:4], atol=1e-5)

    randomize_delta(model, std=0.1)
    out = logits(model, input_ids)
    assert (out - ref).abs().max() > 1e-5
    with model.disable():  # the base weight itself is never rewritten
        assert torch.equal(logits(model, input_ids), ref)
    model.merge()
    assert (logits(model, input_ids) - out).abs().max() < 1e-5
    model.unmerge()
    assert (logits(model, input_ids) - out).abs().max() < 1e-5

    model.save_delta(tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "pissa" and saved["r"] == 4
    restored = model.unload().state_dict()
    assert restored.keys() == original.keys() and all((original[k] - v).abs().max() < 1e-6 for k, v in restored.items())
    fresh = type(base)(base.config).eval()
    fresh.load_state_dict(original)
    assert torch.equal(logits(deltatune.load_delta(fresh, tmp_path / "d"), input_ids), out)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_to_lora(tiny_llama, input_ids, rslora, tmp_path):
    model = deltatune.attach(tiny_llama, {"method": "lora", "init": "pissa", "r": 4, "rslora": rslora})
    randomize_delta(model, std=0.1)
    out = logits(model, input_ids)
    assert pissa_to_lora(model) == "lora"
    cfg = model.delta_configs["lora"]
    assert model.active == ["lora"] and cfg.init == "kaiming" and cfg.r == 8
    assert (logits(model, input_ids) - out).abs().max() < 1e-5
    model.save_delta(tmp_path / "plain", "lora")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["init_lora_weights"] is True
    with pytest.raises(ConfigError, match="delta 'lora' is not a LoRA delta with init: pissa"):
        pissa_to_lora(model, "lora", "again")


def test_pissa_with_dropout_follows_model_mode(tiny_llama, input_ids):
    """Branches attached to a model in eval mode are in eval mode: no dropout, exact identity at init."""
    ref = logits(tiny_llama, input_ids)
    model = deltatune.attach(tiny_llama, {"method": "lora", "init": "pissa", "r": 4, "dropout": 0.5})
    assert torch.equal(logits(model, input_ids), ref)
    model.train()
    assert all(b.training for b in branches(model).values())
    model.eval()
    assert torch.equal(logits(model, input_ids), ref)


def test_pissa_errors(tiny_llama):
    with pytest.raises(deltatune.DeltatuneError, match=r"r=40 exceeds the rank of 'model.layers.0.self_attn.q_proj' \(weight \[32, 32\]\)"):
        deltatune.attach(tiny_llama, {"method": "lora", "init": "pissa", "r": 40})
    with pytest.raises(ConfigError, match="init: pissa fixes the rank"):
        deltatune.attach(tiny_llama, {"method": "lora", "init": "pissa", "rank_allocation": "incremental"})
    assert not list(iter_wrappers(tiny_llama)), "a failed attach leaves no wrapper behind"


# --- incremental rank allocation ---

def test_incremental_starts_small_and_unchanged(tiny_llama, input_ids, tmp_path):
    ref = logits(tiny_llama, input_ids)
    original = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 6, "initial_r": 2})
    cfg = model.delta_configs["default"]
    assert cfg.total_r == 4 * 6 // 2  # default: half of the pre-allocated ranks (4 modules × r 6)
    assert torch.equal(logits(model, input_ids), ref)
    assert set(rank_report(model).values()) == {2}
    # every pre-allocated rank is a parameter from the start: the optimizer's set never changes
    assert model.parameter_report()["trainable"] == 6 * (32 + 32) * 2 + 6 * (32 + 16) * 2

    randomize_delta(model, std=0.2)
    out = logits(model, input_ids)
    model.save_delta(tmp_path / "d")
    model.merge()
    assert (logits(model, input_ids) - out).abs().max() < 1e-5
    model.unmerge()
    assert (logits(model, input_ids) - out).abs().max() < 1e-5
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    fresh.load_state_dict(original)
    loaded = deltatune.load_delta(fresh, tmp_path / "d")
    assert torch.equal(logits(loaded, input_ids), out)
    assert set(rank_report(loaded).values()) == {2}


def test_incremental_budget_errors(tiny_llama):
    with pytest.raises(ConfigError, match=r"total_r=30 must lie between 4 \(4 modules × initial_r 1\) and 24 \(4 modules × r 6\)"):
        deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 6, "total_r": 30})
    with pytest.raises(ConfigError, match="initial_r .* must be at most r"):
        deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 2, "initial_r": 3})
    with pytest.raises(ConfigError, match="grow_every is only used with rank_allocation: incremental"):
        deltatune.attach(tiny_llama, {"method": "lora", "grow_every": 5})


def test_grow_ranks_follows_importance(tiny_llama, input_ids):
    model = deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 4, "total_r": 8,
                                          "grow_every": 2, "grow_count": 2, "importance_beta": 0.0})
    cfg = model.delta_configs["default"]
    named = branches(model)
    order = list(named)
    for i, branch in enumerate(named.values()):  # module i's sensitivity |θ ⊙ ∇θ| grows tenfold with i
        with torch.no_grad():
            branch.lora_A.weight.fill_(1.0)
        branch.lora_A.weight.grad = torch.full_like(branch.lora_A.weight, 10.0**i)
        branch.lora_B.weight.grad = torch.zeros_like(branch.lora_B.weight)
    before = logits(model, input_ids)
    assert grow_ranks(named, cfg, step=1) == []  # not a growth step
    assert grow_ranks(named, cfg, step=2) == [order[3], order[2]]
    assert [named[m].rank for m in order] == [1, 1, 2, 2]
    assert torch.equal(logits(model, input_ids), before), "a new rank starts with a zero B column"
    assert grow_ranks(named, cfg, step=4) == [order[3], order[2]]  # budget 8: 2 left
    assert grow_ranks(named, cfg, step=6) == []  # budget spent
    assert sum(b.rank for b in named.values()) == 8


def test_incremental_allocation_survives_a_checkpoint(tiny_llama, input_ids):
    """Trainer checkpoints hold trainable parameters only; the grown ranks come back from B's columns."""
    model = deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 4})
    named = branches(model)
    first = next(iter(named.values()))
    first.grow()
    first.grow()
    with torch.no_grad():
        first.lora_B.weight[:, :3].normal_(0, 0.3)
    out = logits(model, input_ids)
    trainable = {k: v.clone() for k, v in model.delta_parameters().items()}
    model.detach("default")
    resumed = deltatune.attach(tiny_llama, {"method": "lora", "rank_allocation": "incremental", "r": 4})
    with torch.no_grad():
        for k, p in resumed.delta_parameters().items():
            p.copy_(trainable[k])
    resumed.train()
    assert torch.equal(logits(resumed, input_ids), out)
    assert sorted(rank_report(resumed).values()) == [1, 1, 1, 3]


def test_incremental_rank_grows_in_train(tmp_path):
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train

    lm = save_tiny_lm(tmp_path / "lm")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{name: {lm}}}
        delta: {{method: lora, targets: all-linear, r: 4, alpha: 8, rank_allocation: incremental, initial_r: 1,
                 total_r: 18, grow_every: 2, grow_count: 2}}
        generate: {{task: addition, n_train: 64, n_eval: 8, digits: 2}}
        data: {{template: plain}}
        optim: {{lr: 0.01}}
        train: {{max_steps: 8, batch_size: 8, progress: false}}
        eval: {{max_batches: 1}}
        output: {{dir: {tmp_path}, name: run}}
        """))
    result = train(load_recipe(recipe))
    loaded = deltatune.load_delta(deltatune.load_model(str(lm)), result["adapter"])
    ranks = rank_report(loaded)
    assert len(ranks) == 14  # 2 layers × 7 linear layers
    # 4 growth steps × 2 modules = 8 ranks on top of 14 × 1, under the budget of 18: the budget caps it
    assert sum(ranks.values()) == 18 and max(ranks.values()) <= 4 and max(ranks.values()) >= 2
    for b in branches(loaded).values():
        assert isinstance(b, IncrementalLoraBranch)
        off = b.lora_rank_mask == 0
        assert torch.equal(b.lora_B.weight[:, off], torch.zeros_like(b.lora_B.weight[:, off])), "inactive ranks stay exactly zero"
