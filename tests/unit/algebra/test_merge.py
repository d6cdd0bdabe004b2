"""The merge engine on tiny checkpoints: algebraic properties, adapters, LoRA merging, bad inputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.algebra import merge as merge_mod
from deltatune.algebra.merge import run_merge
from deltatune.algebra.recipe import load_merge_recipe, parse_recipe
from deltatune.utils.errors import ConfigError, DeltatuneError, ShapeMismatchError
from tests.helpers import randomize_delta, save_tiny_bert, save_tiny_lm, tiny_llama_config
from tests.unit.algebra.helpers_algebra import make_checkpoints, weights, write_recipe


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    base, fts = make_checkpoints(root)
    return root, base, fts


def recipe(base, inputs, method, out, **extra):
    data = {"base": str(base) if base else None, "inputs": [{"path": str(p), "weight": w} for p, w in inputs], "method": method, "output": {"path": str(out)}, **extra}
    return parse_recipe({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "dare_ties"])
def test_merge_of_one_input_is_that_input(ckpts, tmp_path, method):
    _, base, fts = ckpts
    params = {"parameters": {"density": 1.0}} if method in ("ties", "dare_ties") else {}
    run_merge(recipe(base, [(fts[0], 1.0)], method, tmp_path / "out", **params))
    got, want = weights(tmp_path / "out"), weights(fts[0])
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-6
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_ties_and_task_arithmetic_match_by_hand(ckpts, tmp_path):
    _, base, fts = ckpts
    run_merge(recipe(base, [(p, w) for p, w in zip(fts, (0.5, 0.3, 0.2))], "task_arithmetic", tmp_path / "ta"))
    b, f = weights(base), [weights(p) for p in fts]
    got = weights(tmp_path / "ta")
    for k in b:
        want = b[k] + 0.5 * (f[0][k] - b[k]) + 0.3 * (f[1][k] - b[k]) + 0.2 * (f[2][k] - b[k])
        assert torch.allclose(got[k], want, atol=1e-6)
    # TIES at density 1 where all task vectors agree in sign equals the weighted mean (= task arithmetic, weights sum to 1).
    run_merge(recipe(base, [(p, w) for p, w in zip(fts, (0.5, 0.3, 0.2))], "ties", tmp_path / "ties", parameters={"density": 1.0}))
    ties = weights(tmp_path / "ties")
    for k in b:
        agree = ((f[0][k] - b[k]).sign() == (f[1][k] - b[k]).sign()) & ((f[1][k] - b[k]).sign() == (f[2][k] - b[k]).sign())
        assert agree.any()
        assert torch.allclose(ties[k][agree], got[k][agree], atol=1e-6)


def test_lines_scales_shallow_layers_towards_base(ckpts, tmp_path):
    _, base, fts = ckpts
    run_merge(recipe(base, [(fts[0], 1.0)], "task_arithmetic", tmp_path / "out", lines={"alpha": 0.0, "beta": 1.0}))
    got, b, f = weights(tmp_path / "out"), weights(base), weights(fts[0])
    k0, k1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(got[k0], b[k0])                                     # layer 0 of 2: λ = α = 0
    assert torch.allclose(got[k1], f[k1], atol=1e-6)                        # last layer: λ = α + β = 1
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def _lora_adapter(base_dir, out, seed, r=4, targets=("q_proj", "v_proj", "up_proj"), rank_pattern=None, init="kaiming"):
    model = deltatune.load_model(base_dir)
    dm = deltatune.attach(model, {"method": "lora", "r": r, "alpha": 2.0 * r, "targets": list(targets), "rank_pattern": rank_pattern or {}, "init": init})
    randomize_delta(dm, std=0.1, seed=seed)
    dm.save_delta(str(out))
    return out


def _merged_error(adapter_dir, base, want) -> float:
    """Largest |W| difference between ``base`` + the merged adapter at ``adapter_dir`` and the dense merge ``want``."""
    dm = deltatune.load_delta(deltatune.load_model(base), adapter_dir)
    dm.merge()
    sd = dm.base_model.state_dict()
    return max((sd.get(k, sd.get(k.rsplit(".", 1)[0] + ".base_layer.weight")) - want[k]).abs().max().item() for k in want)


def _logits(model_dir_or_model, ids):
    model = deltatune.load_model(model_dir_or_model) if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_merge_into_full_model_via_method_contract(ckpts, tmp_path):
    _, base, _ = ckpts
    lora = _lora_adapter(base, tmp_path / "lora", seed=1)
    m = deltatune.load_model(base)
    ia3 = deltatune.attach(m, {"method": "ia3"})
    randomize_delta(ia3, std=0.3, seed=2)
    with torch.no_grad():
        for p in ia3.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ia3.save_delta(str(tmp_path / "ia3"))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    for adapter in (lora, tmp_path / "ia3"):
        run_merge(recipe(base, [(adapter, 1.0)], "task_arithmetic", tmp_path / f"m-{adapter.name}"))
        ref = deltatune.load_delta(deltatune.load_model(base), adapter)
        ref.merge()
        assert torch.allclose(_logits(tmp_path / f"m-{adapter.name}", ids), _logits(ref, ids), atol=1e-5)


def test_lora_concat_merge_is_exact_and_svd_rank(ckpts, tmp_path):
    _, base, _ = ckpts
    a = _lora_adapter(base, tmp_path / "a", seed=1, r=4)
    b = _lora_adapter(base, tmp_path / "b", seed=2, r=2, targets=("q_proj", "k_proj"))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "cat", lora={"mode": "concat"}))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "svd", lora={"mode": "svd", "rank": 6}))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "dense"))
    want = weights(tmp_path / "dense")
    for name in ("cat", "svd"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert deltatune.load_delta(deltatune.load_model(base), tmp_path / name).delta_configs["default"].r == 6
        err = _merged_error(tmp_path / name, base, want)
        assert err < 1e-6, (name, err)   # rank 6 = 4 + 2 holds the weighted sum exactly
    # A smaller rank: each module's error is its SVD tail (Eckart–Young), so below the exact merge's size.
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "ties", tmp_path / "svd2", lora={"mode": "svd", "rank": 2}, parameters={"density": 0.5}))
    assert deltatune.load_delta(deltatune.load_model(base), tmp_path / "svd2").delta_configs["default"].r == 2


def test_lora_concat_merge_with_per_module_ranks_is_exact(ckpts, tmp_path):
    # rank_pattern (as AdaLoRA files load): modules below and above r get zero directions up to the largest rank
    _, base, _ = ckpts
    a = _lora_adapter(base, tmp_path / "a", seed=1, r=4, rank_pattern={"v_proj": 1, "up_proj": 6})
    b = _lora_adapter(base, tmp_path / "b", seed=2, r=2, targets=("q_proj", "k_proj"))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "cat", lora={"mode": "concat"}))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "dense"))
    want = weights(tmp_path / "dense")
    assert deltatune.load_delta(deltatune.load_model(base), tmp_path / "cat").delta_configs["default"].r == 6 + 2
    err = _merged_error(tmp_path / "cat", base, want)
    assert err < 1e-6, err


def test_pissa_merges_through_its_branch_factors(ckpts, tmp_path):
    # PiSSA's ΔW is s·(BA − B₀A₀), rank 2r: read as plain s·BA it would be off by the top-r part of W.
    _, base, _ = ckpts
    a = _lora_adapter(base, tmp_path / "a", seed=1, r=2, init="pissa")
    b = _lora_adapter(base, tmp_path / "b", seed=2, r=2, targets=("q_proj", "k_proj"))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "dense"))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "cat", lora={"mode": "concat"}))
    run_merge(recipe(base, [(a, 0.7), (b, 0.3)], "task_arithmetic", tmp_path / "svd", lora={"mode": "svd", "rank": 6}))
    want = weights(tmp_path / "dense")
    assert deltatune.load_delta(deltatune.load_model(base), tmp_path / "cat").delta_configs["default"].r == 2 * 2 + 2
    for name in ("cat", "svd"):
        err = _merged_error(tmp_path / name, base, want)
        assert err < 1e-5, (name, err)


def test_adapter_output_refuses_deltas_without_low_rank_factors(ckpts, tmp_path):
    _, base, _ = ckpts
    dm = deltatune.attach(deltatune.load_model(base), {"method": "ia3"})
    dm.save_delta(str(tmp_path / "ia3"))
    with pytest.raises(ConfigError, match=r"'.*ia3' is a ia3 delta, which has no exact low-rank factors") as err:
        run_merge(recipe(base, [(tmp_path / "ia3", 1.0)], "task_arithmetic", tmp_path / "out", lora={"mode": "concat"}))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_lora_concat_refuses_nonlinear_method(ckpts, tmp_path):
    _, base, _ = ckpts
    a = _lora_adapter(base, tmp_path / "a", seed=1)
    with pytest.raises(ConfigError, match="lora.mode svd"):
        run_merge(recipe(base, [(a, 1.0), (a, 1.0)], "ties", tmp_path / "out", lora={"mode": "concat"}))
    assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_before_any_output(ckpts, tmp_path):
    root, base, fts = ckpts
    out = tmp_path / "out"
    bert = save_tiny_bert(tmp_path / "bert")
    with pytest.raises(ShapeMismatchError, match="'bert' model but the base"):
        run_merge(recipe(base, [(fts[0], 1.0), (bert, 1.0)], "ties", out))
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_tokenizer
    wide = tmp_path / "wide"
    LlamaForCausalLM(tiny_llama_config(hidden_size=48, vocab_size=len(tiny_tokenizer()))).save_pretrained(wide)
    with pytest.raises(ShapeMismatchError, match="has shape"):
        run_merge(recipe(base, [(fts[0], 1.0), (wide, 1.0)], "ties", out))
    other_base = save_tiny_lm(tmp_path / "otherbase")
    import json
    cfg = json.loads((Path(other_base) / "config.json").read_text())
    cfg["intermediate_size"] = 48
    from transformers import LlamaConfig
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})).save_pretrained(other_base)
    foreign = _lora_adapter(other_base, tmp_path / "foreign", seed=3)
    with pytest.raises(ShapeMismatchError, match="another base"):
        run_merge(recipe(base, [(foreign, 1.0)], "task_arithmetic", out))
    with pytest.raises(ConfigError, match="sum to 0"):
        recipe(base, [(fts[0], 1.0), (fts[1], -1.0)], "ties", out)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="density"):
            recipe(base, [(fts[0], 1.0)], "ties", out, parameters={"density": bad})
    with pytest.raises(ConfigError, match="set 'base'"):
        recipe(None, [(fts[0], 1.0)], "ties", out)
    assert not out.exists()


def test_recipe_file_errors_name_line_and_key(tmp_path):
    path = write_recipe(tmp_path / "m.yaml", {"base": "b", "inputs": [{"path": "x"}], "method": "ties", "paramters": {}, "output": {"path": "o"}})
    with pytest.raises(ConfigError, match=r"m.yaml:5: unknown key 'paramters' \(did you mean 'parameters'\?\)"):
        load_merge_recipe(path)
    path = write_recipe(tmp_path / "n.yaml", {"base": "b", "inputs": [{"path": "x"}], "method": "tie", "output": {"path": "o"}})
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        load_merge_recipe(path)


def test_interrupted_merge_leaves_no_output_dir(ckpts, tmp_path, monkeypatch):
    _, base, fts = ckpts
    calls = {"n": 0}
    real = merge_mod.copy_model_files

    def boom(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod, "copy_model_files", boom)
    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe(base, [(p, 1.0) for p in fts], "ties", tmp_path / "out"))
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []   # neither the output nor its temporary directory
    monkeypatch.setattr(merge_mod, "copy_model_files", real)
    run_merge(recipe(base, [(p, 1.0) for p in fts], "ties", tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_errors_are_deltatune_errors(tmp_path):
    with pytest.raises(DeltatuneError, match="does not exist"):
        run_merge(recipe(tmp_path, [(tmp_path / "missing", 1.0)], "ties", tmp_path / "out"))
