"""Sparse deltas (lt_sft, sparse_dynamic, lift, dsee) and HFT: masks are respected bit for bit,
files round-trip, sparse deltas compose by addition, bad densities and foreign files are refused."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.algebra.sparse import add_sparse, to_dense, top_k_indices
from deltatune.methods.sparse_core import budget
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
        assert torch.equal(branch.sparse_indices.long(), top_k_indices(dense_before[m].abs(), k))
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
            dense = to_dense(a.sparse_indices, a.sparse_values, a.shape) + to_dense(b.sparse_indices, b.sparse_values, b.shape)
            ref_model.get_parameter(m + ".weight").copy_(w0[m + ".weight"] + dense)
            # add_sparse gives the same sum as one sparse delta on the union of the supports
            (idx, vals, shape), = add_sparse([{m: (a.sparse_indices, a.sparse_values, a.shape)}, {m: (b.sparse_indices, b.sparse_values, b.shape)}]).values()
            assert torch.equal(to_dense(idx, vals, shape), dense)
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
    expected = 2.0 * branch.lora_B.weight @ branch.lora_A.weight + to_dense(branch.sparse_indices, branch.sparse_values, branch.shape)
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


def test_top_k_indices_is_the_merge_engines_magnitude_selection():
    from deltatune.algebra.ops import magnitude_mask

    t = torch.randn(37, 23, generator=torch.Generator().manual_seed(3))
    for density in (0.01, 0.05, 0.3, 1.0):
        k = budget(t.numel(), density)
        assert torch.equal(top_k_indices(t, k), magnitude_mask(t, density).reshape(-1).nonzero().squeeze(1))
    ties = torch.tensor([[1.0, -2.0, 2.0, 0.5], [2.0, 0.1, -1.0, 2.0]])  # four entries tie at |2|, k = 3
    assert torch.equal(top_k_indices(ties, 3), torch.argsort(ties.abs().reshape(-1), descending=True)[:3].sort().values)


def test_lt_sft_deltas_are_merge_inputs_and_add_as_sparse_deltas(tmp_path):
    """A domain and a task delta trained with lt_sft: merged by the merge engine (as delta directories,
    or added with add_sparse and written as one sparse delta) they equal the two attached together."""
    from deltatune.algebra.merge import run_merge
    from deltatune.algebra.recipe import parse_recipe
    from deltatune.algebra.sparse import read_sparse, write_sparse
    from deltatune.methods.sparse_core import sparse_delta
    from tests.helpers import save_tiny_lm

    base_dir = save_tiny_lm(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    w0 = base_weights(base)
    ids = IDS % base.config.vocab_size

    def train(model, data, steps):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(steps):
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
            model.on_train_step(step + 1)
            opt.zero_grad(set_to_none=True)

    model = deltatune.attach(base, {"method": "lt_sft", "density": 0.1, "dense_steps": 2}, name="domain")
    train(model, ids.flip(1), 4)
    domain_support = {m: w.deltas["domain"].sparse_indices.clone() for m, w in iter_wrappers(base)}
    model.attach({"method": "lt_sft", "density": 0.05, "dense_steps": 2}, name="task")
    model.set_active(["domain", "task"])  # the task delta trains on top of the domain delta, as in LT-SFT
    train(model, ids, 4)
    assert all(torch.equal(w.deltas["domain"].sparse_indices, domain_support[m]) for m, w in iter_wrappers(base))
    both = model(input_ids=ids).logits
    model.save_delta(tmp_path / "domain", name="domain")
    model.save_delta(tmp_path / "task", name="task")
    summed = add_sparse([sparse_delta(model, "domain"), sparse_delta(model, "task")])
    write_sparse(tmp_path / "sum", summed, str(base_dir))

    def merge(inputs, out):
        run_merge(parse_recipe({"base": str(base_dir), "inputs": [{"path": str(p), "weight": 1.0} for p in inputs],
                                "method": "task_arithmetic", "output": {"path": str(out)}}), log=lambda *a: None)
        return LlamaForCausalLM.from_pretrained(out).eval()

    by_dirs = merge([tmp_path / "domain", tmp_path / "task"], tmp_path / "m1")
    by_sum = merge([tmp_path / "sum"], tmp_path / "m2")
    assert set(read_sparse(tmp_path / "sum")) == {m + ".weight" for m, _ in iter_wrappers(base)}
    for merged in (by_dirs, by_sum):
        weights = dict(merged.named_parameters())
        for name, w in w0.items():
            want = w + to_dense(*summed[name]) if name in summed else w
            assert torch.allclose(weights[name], want, atol=1e-6), name
        assert (merged(input_ids=ids).logits - both).abs().max() < 1e-4
    # the supports overlap or not, but the sum never holds more entries than the two deltas
    assert all(summed[n][0].numel() <= sparse_delta(model, "domain")[n][0].numel() + sparse_delta(model, "task")[n][0].numel() for n in summed)
