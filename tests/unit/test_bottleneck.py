import pytest
import torch

import deltatune
from tests.helpers import randomize_delta


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("config, n_modules, per_module", [
    ({"placement": "parallel", "size": 8}, 2, 32 * 8 + 8 + 8 * 32 + 32),            # llama mlp: 32 -> 32
    ({"placement": "sequential", "size": 4, "targets": ["self_attn"]}, 2, 32 * 4 + 4 + 4 * 32 + 32),  # a tuple-returning block
])
def test_placements_on_llama(tiny_llama, input_ids, config, n_modules, per_module, tmp_path):
    ref = logits(tiny_llama, input_ids)
    model = deltatune.attach(tiny_llama, {"method": "bottleneck", **config})
    assert len(model.delta_targets["default"]) == n_modules
    assert model.parameter_report()["trainable"] == n_modules * per_module
    assert torch.equal(logits(model, input_ids), ref)  # zero-initialised up-projection
    randomize_delta(model, std=0.3)
    out = logits(model, input_ids)
    assert (out - ref).abs().max() > 1e-4
    model.save_delta(tmp_path / "a")
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_parallel_on_bert_and_not_mergeable(tiny_bert_cls):
    model = deltatune.attach(tiny_bert_cls, {"method": "bottleneck", "placement": "parallel", "size": 4})
    # BERT default: every output.dense (attention output and FFN output), each 4 layers' worth
    assert sorted(model.delta_targets["default"]) == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    with pytest.raises(deltatune.DeltatuneError, match="cannot be merged"):
        model.merge()
