"""Sparse deltas (lt_sft, sparse_dynamic, lift, dsee) and HFT: masks are respected bit for bit,
files round-trip, sparse deltas compose by addition, bad densities and foreign files are refused."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.methods.sparse_core import add_sparse, budget, scatter_dense, top_indices
from deltatune.utils.errors import ConfigError, ShapeMismatchError
from tests.helpers import tiny_llama_config

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def make_base(seed=0, **cfg):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**cfg)).eval()


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, steps, lr=1e-2, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(start, start + steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        model.on_train_step(step + 1)
        opt.zero_grad(set_to_none=True)


def merged_weights(model):
    model.merge()
    out = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".deltas." not in n}
    model.unmerge()
    return {n.replace(".base_layer", ""): p for n, p in out.items()}


def test_lt_sft_selects_top_k_of_dense_phase_then_trains_only_those(tmp_path):
    base = make_base()
    w0 = base_weights(base)
    model = deltatune.attach(base, {"method": "lt_sft", "density": 0.05, "dense_steps": 3, "targets": "all-linear"})
    train_steps(model, 2)
    wrappers = dict(iter_wrappers(base))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    dense_before = {m: w.deltas["default"].dense_delta.detach().clone() for m, w in wrappers.items()}
    model.on_train_step(3)  # end of the dense phase: select, reset
    for m, w in wrappers.items():
        branch = w.deltas["default"]
        k = budget(dense_before[m].numel(), 0.05)
        assert torch.equal(branch.sparse_indices.long(), top_indices(dense_before[m].abs(), k))
        assert not branch.sparse_values.any() and branch.dense_delta.numel() == 0
    with model.disable():
        ref = model(input_ids=IDS).logits
    assert torch.equal(model(input_ids=IDS).logits, ref)  # reset to θ₀
    train_steps(model, 4, start=3)
    out = model(input_ids=IDS).logits
    model.save_delta(tmp_path / "d")
    merged = merged_weights(model)
    for m, w in wrappers.items():
        branch = w.deltas["default"]
        mask = torch.zeros(branch.shape[0] * branch.shape[1], dtype=torch.bool)
        mask[branch.sparse_indices.long()] = True
        mask = mask.view(branch.shape)
        name = m + ".weight"
        assert torch.equal(merged[name][~mask], w0[name][~mask])  # frozen entries: bit-identical
        assert (merged[name][mask] != w0[name][mask]).any()
    # save → load → apply equals the trained model (saved before the merge above: W + ΔW − ΔW rounds)
    fresh = make_base()
    loaded = deltatune.load_delta(fresh, tmp_path / "d")
    assert torch.equal(loaded(input_ids=IDS).logits, out)


def test_lt_sft_refuses_to_save_in_dense_phase(tmp_path):
    model = deltatune.attach(make_base(), {"method": "lt_sft", "dense_steps": 5})
    with pytest.raises(deltatune.DeltatuneError, match="still in its dense phase"):
        model.save_delta(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.delta_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_two_sparse_deltas_compose_to_the_dense_sum():
    base = make_base()
    w0 = base_weights(base)
    model = deltatune.attach(base, {"method": "lt_sft", "density": 0.1, "seed": 1}, name="domain")
    model.attach({"method": "lt_sft", "density": 0.1, "seed": 2}, name="task")
    randomize(model, "domain", 0)
    randomize(model, "task", 1)
    model.set_active(["domain", "task"])
    out = model(input_ids=IDS).logits
    # reference: a plain model with W + ΔW_domain + ΔW_task written densely
    ref_model = make_base()
    wrappers = dict(iter_wrappers(base))
    with torch.no_grad():
        for m, w in wrappers.items():
            a, b = w.deltas["domain"], w.deltas["task"]
            dense = scatter_dense(a.sparse_indices, a.sparse_values, a.shape) + scatter_dense(b.sparse_indices, b.sparse_values, b.shape)
            ref_model.get_parameter(m + ".weight").copy_(w0[m + ".weight"] + dense)
            # add_sparse gives the same sum as one sparse delta on the union of the supports
            idx, vals = add_sparse((a.sparse_indices, a.sparse_values), (b.sparse_indices, b.sparse_values))
            assert torch.equal(scatter_dense(idx, vals, a.shape), dense)
            assert idx.numel() <= a.sparse_indices.numel() + b.sparse_indices.numel()
    assert (ref_model(input_ids=IDS).logits - out).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["lt_sft", "sparse_dynamic", "lift", "dsee"])
@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_unit_interval_is_refused(method, density):
    with pytest.raises(ConfigError, match="density"):
        deltatune.attach(make_base(), {"method": method, "density": density})


def test_delta_for_another_model_is_refused(tmp_path):
    model = deltatune.attach(make_base(), {"method": "lift", "density": 0.1})
    model.save_delta(tmp_path / "d")
    other = make_base(hidden_size=48, intermediate_size=96)
    with pytest.raises(ShapeMismatchError, match="saved for another base model"):
        deltatune.load_delta(other, tmp_path / "d")
    assert not list(iter_wrappers(other))
    # same shapes, but indices beyond the matrix (a tampered or foreign file): refused by module name
    tensors = load_file(tmp_path / "d" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.sparse_indices"))
    tensors[key][0] = 10**6
    save_file(tensors, tmp_path / "d" / "adapter_model.safetensors")
    loaded = deltatune.load_delta(make_base(), tmp_path / "d")
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*outside its weight \[32, 32\]"):
        loaded(input_ids=IDS)


def test_lift_support_is_top_k_of_the_low_rank_approximation():
    base = make_base()
    w = base_weights(base)["model.layers.0.mlp.up_proj.weight"]
    model = deltatune.attach(base, {"method": "lift", "density": 0.1, "rank": 2, "targets": ["model.layers.0.mlp.up_proj"]})
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    expected = set(torch.topk(low.abs().reshape(-1), budget(w.numel(), 0.1)).indices.tolist())
    branch = dict(iter_wrappers(base))["model.layers.0.mlp.up_proj"].deltas["default"]
    assert set(branch.sparse_indices.tolist()) == expected
    assert model.parameter_report()["trainable"] == len(expected)


def test_dsee_is_low_rank_plus_sparse_on_largest_weights():
    base = make_base()
    w = base_weights(base)["model.layers.1.self_attn.o_proj.weight"]
    model = deltatune.attach(base, {"method": "dsee", "r": 2, "alpha": 4, "density": 0.05, "targets": ["model.layers.1.self_attn.o_proj"]})
    randomize(model, "default", 3)
    branch = dict(iter_wrappers(base))["model.layers.1.self_attn.o_proj"].deltas["default"]
    assert set(branch.sparse_indices.tolist()) == set(torch.topk(w.abs().reshape(-1), budget(w.numel(), 0.05)).indices.tolist())
    expected = 2.0 * branch.lora_B.weight @ branch.lora_A.weight + scatter_dense(branch.sparse_indices, branch.sparse_values, branch.shape)
    assert torch.allclose(branch.delta_weight(None), expected)
    x = torch.randn(3, 32)
    assert torch.allclose(branch(x, torch.zeros(3, 32)), x @ expected.T, atol=1e-6)


def test_sparse_dynamic_keeps_its_budget_and_regrows_by_gradient():
    base = make_base()
    model = deltatune.attach(base, {"method": "sparse_dynamic", "density": 0.05, "update_every": 2, "drop_fraction": 0.5})
    count = model.parameter_report()["trainable"]
    wrappers = dict(iter_wrappers(base))
    before = {m: set(w.deltas["default"].sparse_indices.tolist()) for m, w in wrappers.items()}
    train_steps(model, 2)
    for m, w in wrappers.items():
        b = w.deltas["default"]
        now = b.sparse_indices.tolist()
        assert len(set(now)) == len(now) == b.sparse_values.numel()  # unique, same budget
        moved = set(now) - before[m]
        assert len(moved) == int(0.5 * len(now))
        assert all(b.sparse_values[i] == 0 for i, idx in enumerate(now) if idx in moved)  # regrown at θ₀
    assert model.parameter_report()["trainable"] == count


def test_hft_trains_half_the_matrices_per_layer_and_redraws_per_stage(tmp_path):
    base = make_base()
    w0 = base_weights(base)
    model = deltatune.attach(base, {"method": "hft", "stage_steps": 2, "seed": 3})
    cfg = model.delta_configs["default"]
    wrappers = dict(iter_wrappers(base))
    for layer in ("model.layers.0.", "model.layers.1."):
        members = [m for m in wrappers if m.startswith(layer)]
        assert sum(m in cfg.active for m in members) == round(0.5 * len(members)) == 4  # 7 linears → 4 (round half to even)
    stage0 = {m for m in wrappers if wrappers[m].deltas["default"].trainable_now}
    assert stage0 == set(cfg.active)
    train_steps(model, 1)
    merged = merged_weights(model)
    for m in wrappers:
        changed = not torch.equal(merged[m + ".weight"], w0[m + ".weight"])
        assert changed == (m in stage0)  # frozen matrices: bit-identical
    train_steps(model, 1, start=1)  # step 2 starts stage 1: a new draw
    stage1 = {m for m in wrappers if wrappers[m].deltas["default"].trainable_now}
    assert stage1 != stage0
    masks = {m: wrappers[m].deltas["default"].hft_mask[:2].tolist() for m in wrappers}
    assert all(masks[m] == [int(m in stage0), int(m in stage1)] for m in wrappers)
    model.save_delta(tmp_path / "h")
    saved = load_file(tmp_path / "h" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.up_proj.hft_mask"][:2].tolist() == masks["model.layers.0.mlp.up_proj"]


def test_sparse_file_at_one_percent_is_small(tmp_path):
    base = make_base(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    model = deltatune.attach(base, {"method": "lt_sft", "density": 0.01})
    model.save_delta(tmp_path / "s")
    dense_bytes = sum(w.base_layer.weight.numel() * 4 for _, w in iter_wrappers(base))
    size = (tmp_path / "s" / "adapter_model.safetensors").stat().st_size
    assert size <= 0.03 * dense_bytes, (size, dense_bytes)
