"""OT fusion on tiny models: permutation recovery, function preservation, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune
from deltatune.algebra.ot_fusion import align_to, neuron_groups, ot_fuse, ot_fuse_model, relabelled
from deltatune.utils.errors import ConfigError, ShapeMismatchError
from tests.helpers import tiny_bert_config, tiny_llama_config


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Dropout(0.0), nn.Linear(12, 3)).eval()


def permuted(model: nn.Module, seed: int, heads: bool = False) -> nn.Module:
    """The same function with every alignable group's units permuted."""
    return relabelled(model, seed, heads)


def test_groups_found_by_structure(tiny_llama, tiny_bert_cls):
    assert [g.inputs for g in neuron_groups(mlp(0))] == [("0",), ("2",)]
    assert [g.outputs for g in neuron_groups(mlp(0))] == [("2",), ("5",)]
    assert [g.inputs for g in neuron_groups(tiny_llama)][0] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    bert = neuron_groups(tiny_bert_cls, heads=True)
    assert [g.kind for g in bert] == ["ffn", "heads", "ffn", "heads"]  # a layer before its attention child
    assert bert[1].block == 8 and bert[1].outputs == ("bert.encoder.layer.0.attention.output.dense",)


@pytest.mark.parametrize("heads", [False, True])
def test_fusing_a_model_with_its_permuted_copy_gives_the_model_back(heads):
    from transformers import BertModel

    torch.manual_seed(0)
    bert = BertModel(tiny_bert_config()).eval()
    twin = permuted(bert, seed=1, heads=heads)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = bert(input_ids=ids).last_hidden_state
        assert torch.allclose(twin(input_ids=ids).last_hidden_state, ref, atol=1e-5)  # relabelling keeps the function
        fused = ot_fuse_model([bert, twin], heads=heads)
        assert torch.allclose(fused(input_ids=ids).last_hidden_state, ref, atol=1e-5)
        # Plain averaging of the same pair is a different function.
        avg = copy.deepcopy(bert)
        avg.load_state_dict({k: (v + twin.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in bert.state_dict().items()})
        assert (avg(input_ids=ids).last_hidden_state - ref).abs().max() > 1e-2


def test_deep_classifier_head_of_an_encoder_is_aligned_layer_by_layer(tiny_bert_cls):
    """The shape of bench/ot_fusion_sst2.py --depth 3: a BERT classifier whose head is an MLP with
    three hidden layers. Each hidden layer is its own group after the encoder's FFN blocks, and
    fusing the model with a relabelled copy gives the model's logits back (plain averaging does not)."""
    torch.manual_seed(3)
    model = copy.deepcopy(tiny_bert_cls).eval()
    width = model.config.hidden_size
    model.classifier = nn.Sequential(nn.Linear(width, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(),
                                     nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 2)).eval()
    groups = neuron_groups(model)
    assert [g.inputs for g in groups][-3:] == [("classifier.0",), ("classifier.2",), ("classifier.4",)]
    assert [g.outputs for g in groups][-3:] == [("classifier.2",), ("classifier.4",), ("classifier.6",)]
    twin = permuted(model, seed=4)
    ids = torch.randint(0, 128, (3, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.allclose(twin(input_ids=ids).logits, ref, atol=1e-5)
        assert torch.allclose(ot_fuse_model([model, twin])(input_ids=ids).logits, ref, atol=1e-5)
        avg = copy.deepcopy(model)
        avg.load_state_dict({k: (v + twin.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in model.state_dict().items()})
        assert (avg(input_ids=ids).logits - ref).abs().max() > 1e-3


def test_mlp_chain_alignment_recovers_each_layer_permutation():
    a = mlp(0)
    b = permuted(a, seed=2)
    aligned, maps = align_to(a.state_dict(), b.state_dict(), neuron_groups(a))
    for key, value in a.state_dict().items():
        assert torch.allclose(aligned[key], value, atol=1e-6), key
    assert all(torch.equal(m.sum(0), torch.ones(m.shape[0], dtype=m.dtype)) for m in maps)  # permutation matrices


def test_llama_ffn_fusion_is_exact_on_a_relabelled_copy(tiny_llama, input_ids):
    twin = permuted(tiny_llama, seed=3)
    fused = ot_fuse_model([tiny_llama, twin, twin], weights=[1, 2, 1])
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=input_ids).logits, tiny_llama(input_ids=input_ids).logits, atol=1e-5)


def test_fusion_of_different_models_equals_the_average_of_aligned_weights():
    a, b = mlp(0), mlp(1)
    groups = neuron_groups(a)
    aligned, _ = align_to(a.state_dict(), b.state_dict(), groups)
    fused = ot_fuse([a, b], weights=[3, 1])
    for key, value in a.state_dict().items():
        assert torch.allclose(fused[key], 0.75 * value + 0.25 * aligned[key], atol=1e-6)
    # The plan pairs units by cost: with b's units as a's plus small noise, permuted, the identity pairing is recovered.
    noisy = copy.deepcopy(a)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    aligned, _ = align_to(a.state_dict(), permuted(noisy, seed=5).state_dict(), groups)
    for key in a.state_dict():
        assert torch.allclose(aligned[key], noisy.state_dict()[key], atol=1e-6)


def test_refusals(tiny_llama):
    from transformers import LlamaForCausalLM

    a = mlp(0)
    with pytest.raises(ConfigError, match="at least two models"):
        ot_fuse([a])
    with pytest.raises(ConfigError, match="sum to zero"):
        ot_fuse([a, mlp(1)], weights=[1, -1])
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        ot_fuse([a, a, a], weights=[1, 1])
    torch.manual_seed(0)
    wide = LlamaForCausalLM(tiny_llama_config(intermediate_size=96)).eval()
    with pytest.raises(ShapeMismatchError, match="has shape"):
        ot_fuse([tiny_llama, wide])
    with pytest.raises(ShapeMismatchError, match="one architecture"):
        ot_fuse([tiny_llama, a])
    with pytest.raises(ConfigError, match="no alignable hidden layers"):
        ot_fuse([nn.Linear(3, 3), nn.Linear(3, 3)])
    torch.manual_seed(0)
    other = LlamaForCausalLM(tiny_llama_config()).eval()
    deltatune.attach(other, {"method": "lora", "r": 2})
    with pytest.raises(ConfigError, match="has deltas attached"):
        ot_fuse([tiny_llama, other])


def test_ot_fusion_as_a_merge_recipe_method(tmp_path):
    """`method: ot_fusion` in a merge recipe: HF directories in, a HF directory out that is the
    aligned average — for a model and its relabelled twin, the model itself; a delta is refused."""
    from transformers import BertForSequenceClassification

    from deltatune.algebra.merge import run_merge
    from deltatune.algebra.recipe import parse_recipe

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    twin = permuted(model, seed=3, heads=True)
    model.save_pretrained(tmp_path / "a")
    twin.save_pretrained(tmp_path / "b")
    recipe = parse_recipe({"inputs": [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}], "method": "ot_fusion",
                           "parameters": {"heads": True}, "output": {"path": str(tmp_path / "fused")}})
    report = run_merge(recipe)
    assert report["method"] == "ot_fusion" and report["aligned_groups"] == 4
    fused = BertForSequenceClassification.from_pretrained(tmp_path / "fused").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    adapter = tmp_path / "adapter"
    deltatune.attach(BertForSequenceClassification(tiny_bert_config(num_labels=2)), {"method": "lora"}).save_delta(adapter)
    bad = parse_recipe({"inputs": [{"path": str(tmp_path / "a")}, {"path": str(adapter)}], "method": "ot_fusion", "output": {"path": str(tmp_path / "never")}})
    with pytest.raises(ConfigError, match="ot_fusion averages full models"):
        run_merge(bad)
    assert not (tmp_path / "never").exists()
