"""LoFiT: per-head scales under an L1 penalty, head selection, per-head bias offsets."""
import json
import textwrap

import pytest
import torch

import deltatune
from deltatune.core.inject import iter_wrappers
from deltatune.methods.lofit import LofitBranch, select_heads
from deltatune.utils.errors import ConfigError, TargetError
from tests.helpers import save_tiny_lm


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def branches(model, name="default"):
    return {m: w.deltas[name] for m, w in iter_wrappers(model.base_model) if name in w.deltas}


def test_transform_is_per_head():
    branch = LofitBranch(num_heads=3, head_dim=2, stage="scale", heads=None, l1=0.5, dtype=torch.float32)
    with torch.no_grad():
        branch.lofit_scale.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0], [-0.5, 3.0]]))
    x = torch.randn(2, 5, 6)
    expected = (x.view(2, 5, 3, 2) * (1 + branch.lofit_scale)).reshape(2, 5, 6)
    assert torch.equal(branch.transform_input(x), expected)
    assert branch.regularization().item() == pytest.approx(0.5 * 6.5)

    bias = LofitBranch(num_heads=3, head_dim=2, stage="bias", heads=[2, 0], l1=0.0, dtype=torch.float32)
    with torch.no_grad():
        bias.lofit_bias.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
    assert torch.equal(bias.transform_input(torch.zeros(1, 6)), torch.tensor([[7.0, 8.0, 0.0, 0.0, 5.0, 6.0]]))
    assert bias.regularization() is None


@pytest.mark.parametrize("model_name,leaf", [("tiny_llama", "self_attn.o_proj"), ("tiny_bert_cls", "attention.output.dense")])
def test_two_stages(model_name, leaf, input_ids, request, tmp_path):
    base = request.getfixturevalue(model_name)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ref = logits(base, input_ids)
    model = deltatune.attach(base, {"method": "lofit"})
    named = branches(model)
    assert len(named) == 2 and all(m.endswith(leaf) for m in named)
    assert torch.equal(logits(model, input_ids), ref)
    assert model.parameter_report()["trainable"] == 2 * 4 * 8  # 2 layers × 4 heads × head_dim 8

    # give layer 1 head 2 and layer 0 head 3 the largest scales
    layer0, layer1 = list(named)
    with torch.no_grad():
        named[layer0].lofit_scale.fill_(0.01)
        named[layer1].lofit_scale.fill_(0.02)
        named[layer1].lofit_scale[2] = 0.5
        named[layer0].lofit_scale[3] = -0.4
    scaled = logits(model, input_ids)
    model.merge()  # W ← W diag(1 + a)
    assert (logits(model, input_ids) - scaled).abs().max() < 1e-5
    model.unmerge()
    stage2 = select_heads(model, top_percent=25)  # 25% of 8 heads = 2
    assert stage2.stage == "bias" and stage2.heads == {layer0: [3], layer1: [2]}
    model.detach("default")
    base.load_state_dict(original)  # undo the rounding of the merge round trip

    model = deltatune.attach(base, stage2)
    assert torch.equal(logits(model, input_ids), ref)
    assert model.parameter_report()["trainable"] == 2 * 8  # two heads × head_dim
    with torch.no_grad():
        for b in branches(model).values():
            b.lofit_bias.normal_(0, 0.5)
    out = logits(model, input_ids)
    assert (out - ref).abs().max() > 1e-5
    had_bias = dict(base.named_modules())[layer0 + ".base_layer"].bias is not None
    model.merge()  # b ← b + W v; llama's o_proj has no bias and gets one while merged
    assert dict(base.named_modules())[layer0].bias is not None
    assert (logits(model, input_ids) - out).abs().max() < 1e-5
    model.unmerge()
    assert (dict(base.named_modules())[layer0 + ".base_layer"].bias is not None) == had_bias
    assert (logits(model, input_ids) - out).abs().max() < 1e-5

    model.save_delta(tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "deltatune.json").read_text())
    assert saved["config"]["heads"] == {layer0: [3], layer1: [2]}
    fresh = type(base)(base.config).eval()
    fresh.load_state_dict(original)
    assert torch.equal(logits(deltatune.load_delta(fresh, tmp_path / "d"), input_ids), out)


def test_errors(tiny_llama):
    with pytest.raises(ConfigError, match="heads is only used with stage: bias"):
        deltatune.attach(tiny_llama, {"method": "lofit", "heads": {"model.layers.0.self_attn.o_proj": [0]}})
    with pytest.raises(TargetError, match=r"heads\['model.layers.0.self_attn.o_proj'\] has head 7, but the layer has 4 heads"):
        deltatune.attach(tiny_llama, {"method": "lofit", "stage": "bias", "heads": {"model.layers.0.self_attn.o_proj": [7]}})
    with pytest.raises(TargetError, match="'model.layers.0.self_attn.o_proj' has 32 input features, not a multiple of num_heads=3"):
        deltatune.attach(tiny_llama, {"method": "lofit", "num_heads": 3})
    with pytest.raises(ConfigError, match="no LoFiT scale-stage delta named 'default'"):
        select_heads(deltatune.attach(tiny_llama, {"method": "lofit", "stage": "bias"}))
    assert len(branches(deltatune.DeltaModel.of(tiny_llama))) == 2


def test_l1_penalty_shrinks_scales_in_train(tmp_path):
    """The trainer adds the branches' regularization(): with a strong L1 the head scales stay smaller."""
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train

    lm = save_tiny_lm(tmp_path / "lm")
    sizes = {}
    for l1 in (0.0, 0.05):
        recipe = tmp_path / f"r{l1}.yaml"
        recipe.write_text(textwrap.dedent(f"""\
            model: {{name: {lm}}}
            delta: {{method: lofit, l1: {l1}}}
            generate: {{task: addition, n_train: 64, n_eval: 8, digits: 2}}
            data: {{template: plain}}
            optim: {{lr: 0.01, weight_decay: 0.0}}
            train: {{max_steps: 8, batch_size: 8, progress: false}}
            eval: {{max_batches: 1}}
            output: {{dir: {tmp_path}, name: run{l1}}}
            """))
        result = train(load_recipe(recipe))
        model = deltatune.load_delta(deltatune.load_model(str(lm)), result["adapter"])
        sizes[l1] = sum(b.lofit_scale.abs().sum().item() for b in branches(model).values())
    assert sizes[0.0] > 0
    assert sizes[0.05] < 0.5 * sizes[0.0]
