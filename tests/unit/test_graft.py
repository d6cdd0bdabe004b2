"""Grafting: base + top-k of |Δθ| per matrix; density 1 restores the fine-tuned model."""
import pytest
import torch
from transformers import LlamaForCausalLM

import deltatune
from deltatune.graft import graft, graft_curve
from deltatune.utils.errors import ConfigError, ShapeMismatchError
from tests.helpers import tiny_llama_config

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def pair(seed=0, **cfg):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(**cfg)).eval()
    ft = LlamaForCausalLM(tiny_llama_config(**cfg)).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * 0.05)
    return base, ft


def test_graft_keeps_the_largest_changes_and_full_density_is_the_finetuned_model(tmp_path):
    base, ft = pair()
    w0 = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = graft(base, ft, 0.1)
    model.merge()
    merged = base.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
    model.unmerge()
    diff = ft.model.layers[0].mlp.up_proj.weight.detach() - w0
    keep = torch.zeros(diff.numel(), dtype=torch.bool)
    keep[torch.topk(diff.abs().reshape(-1), int(0.1 * diff.numel())).indices] = True
    keep = keep.view(diff.shape)
    assert torch.equal(merged[~keep], w0[~keep])
    assert torch.allclose(merged[keep], w0[keep] + diff[keep], atol=1e-6)
    model.save_delta(tmp_path / "g")
    assert deltatune.load_delta(pair()[0], tmp_path / "g").delta_configs["default"].method == "lt_sft"

    full_base, _ = pair()
    full = graft(full_base, ft, 1.0)
    with torch.no_grad():
        assert (full(input_ids=IDS).logits - ft(input_ids=IDS).logits).abs().max() < 1e-4


def test_graft_curve_reports_metric_against_density():
    _, ft = pair()
    with torch.no_grad():
        target = ft(input_ids=IDS).logits

    def closeness(m):
        with torch.no_grad():
            return -float((m(input_ids=IDS).logits - target).abs().mean())

    rows = graft_curve(lambda: pair()[0], ft, [0.01, 0.3, 1.0], closeness)
    assert [r["density"] for r in rows] == [0.01, 0.3, 1.0]
    assert rows[0]["metric"] < rows[1]["metric"] < rows[2]["metric"]


def test_graft_refuses_bad_density_and_another_architecture():
    base, ft = pair()
    with pytest.raises(ConfigError, match="density must be in"):
        graft(base, ft, 0.0)
    _, other = pair(hidden_size=48, intermediate_size=96)
    with pytest.raises(ShapeMismatchError, match="in the fine-tuned model but"):
        graft(base, other, 0.1)
    assert not deltatune.DeltaModel.of(base).delta_configs  # nothing left attached
