"""Prefix tuning and prompt tuning: shapes, parameter counts, generation with the KV cache,
the trainer's backbone path, folding of the MLP at save, detach/unload and refusals."""
import json

import pytest
import torch
from safetensors import safe_open

import deltatune
from deltatune.train.objective import CausalLMObjective
from tests.helpers import randomize_delta, tiny_bert_config, tiny_llama_config

METHODS = ["prompt_tuning", "prefix_tuning"]
V = 4
# tiny llama: hidden 32, 4 heads (head dim 8), 2 key/value heads, 2 layers
PARAMS = {"prompt_tuning": V * 32, "prefix_tuning": V * 2 * 2 * (2 * 8)}


def llama(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


@pytest.mark.parametrize("method", METHODS)
def test_outputs_keep_length_change_at_init_and_count(method, input_ids):
    base = llama()
    ref = logits(base, input_ids=input_ids)
    model = deltatune.attach(base, {"method": method, "num_virtual_tokens": V})
    assert not deltatune.get_method(method).capabilities.unchanged_at_init
    out = logits(model, input_ids=input_ids)
    assert out.shape == ref.shape  # virtual positions are not in the output
    assert (out - ref).abs().max() > 1e-4
    assert model.parameter_report()["trainable"] == PARAMS[method]
    assert model.delta_targets["default"] == ["model"]


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_cache_matches_no_cache_and_full_forward(method):
    model = deltatune.attach(llama(), {"method": method, "num_virtual_tokens": V})
    randomize_delta(model, std=0.5)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # Greedy decoding by full forward passes over the unpadded first row.
    seq = ids[:1]
    for _ in range(6):
        seq = torch.cat([seq, logits(model, input_ids=seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached[:1], seq)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_backbone_path_matches_full_model(method):
    """The trainer's chunked LM loss calls the backbone directly; it must see the same delta."""
    model = deltatune.attach(llama(), {"method": method, "num_virtual_tokens": V})
    randomize_delta(model, std=0.5)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss_sum, n = CausalLMObjective(model)(batch)
    full = model(input_ids=ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert n == 14
    assert abs(loss_sum.item() - expected.item()) < 1e-4
    loss_sum.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all(p.requires_grad for k, p in model.named_parameters() if k in grads)
    assert sum(g.numel() for g in grads.values()) == PARAMS[method]


def test_prefix_projection_is_trained_and_folded_at_save(tmp_path, input_ids):
    h = 16
    model = deltatune.attach(llama(), {"method": "prefix_tuning", "num_virtual_tokens": V, "projection_size": h})
    d_kv, width = 16, 2 * 2 * 16
    assert model.parameter_report()["trainable"] == V * d_kv + (d_kv + 1) * h + (h + 1) * width
    randomize_delta(model, std=0.3)
    out = logits(model, input_ids=input_ids)
    model.save_delta(tmp_path / "d")
    with safe_open(str(tmp_path / "d" / "adapter_model.safetensors"), "pt") as f:
        assert {k: list(f.get_tensor(k).shape) for k in f.keys()} == {"prompt_embeddings": [V, width]}
    saved = json.loads((tmp_path / "d" / "deltatune.json").read_text())["config"]
    assert saved["projection_size"] is None
    loaded = deltatune.load_delta(llama(), tmp_path / "d")
    assert loaded.parameter_report()["trainable"] == V * width
    assert torch.equal(logits(loaded, input_ids=input_ids), out)


@pytest.mark.parametrize("method", METHODS)
def test_unload_disable_and_merge_refusal(method, input_ids):
    base = llama()
    keys = list(base.state_dict())
    ref = logits(base, input_ids=input_ids)
    model = deltatune.attach(base, {"method": method, "num_virtual_tokens": V})
    with model.disable():
        assert torch.equal(logits(model, input_ids=input_ids), ref)
    with pytest.raises(deltatune.DeltatuneError, match="cannot be merged"):
        model.merge()
    restored = model.unload()
    assert list(restored.state_dict()) == keys
    assert torch.equal(logits(restored, input_ids=input_ids), ref)


@pytest.mark.parametrize("method", METHODS)
def test_bert_classifier_with_token_types(method, tmp_path, input_ids):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    model = deltatune.attach(base, {"method": method, "num_virtual_tokens": V, "modules_to_save": ["classifier"]})
    randomize_delta(model, std=0.3)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": torch.zeros_like(input_ids)}
    out = logits(model, **batch)
    assert out.shape == (2, 3)
    model.save_delta(tmp_path / "d")
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(tiny_bert_config()).eval()
    assert torch.equal(logits(deltatune.load_delta(fresh, tmp_path / "d"), **batch), out)


def test_bare_backbone_is_refused():
    from transformers import LlamaModel

    with pytest.raises(deltatune.DeltatuneError, match="has no backbone child module"):
        deltatune.attach(LlamaModel(tiny_llama_config()), {"method": "prompt_tuning"})


def test_prefix_file_for_another_model_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    model = deltatune.attach(llama(), {"method": "prefix_tuning", "num_virtual_tokens": V})
    model.save_delta(tmp_path / "d")
    deeper = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    with pytest.raises(deltatune.DeltatuneError, match=r"'prompt_embeddings' has shape \[4, 64\], but the model needs \[4, 96\]"):
        deltatune.load_delta(deeper, tmp_path / "d")
    assert deltatune.DeltaModel.of(deeper).delta_configs == {}


@pytest.mark.slow
def test_smollm2_prefix_generation_and_peft(tmp_path):
    """Real SmolLM2-135M: default prefix tuning generates the same with and without the KV cache, and PEFT reads its file."""
    peft = pytest.importorskip("peft")
    tok = deltatune.load_tokenizer("smollm2-135m-instruct")
    enc = tok("The capital of France is", return_tensors="pt")
    model = deltatune.attach(deltatune.load_model("smollm2-135m-instruct"), {"method": "prefix_tuning"})
    randomize_delta(model, std=0.05)
    cached = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert torch.equal(cached, model.generate(**enc, max_new_tokens=3, do_sample=False, use_cache=False))
    ours = logits(model, **enc)
    model.save_delta(tmp_path / "d")
    theirs = logits(peft.PeftModel.from_pretrained(deltatune.load_model("smollm2-135m-instruct"), str(tmp_path / "d")).eval(), **enc)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", [*METHODS, "bundle"])
def test_minilm_classifier_defaults(method, tmp_path):
    tok = deltatune.load_tokenizer("minilm-l6")
    batch = dict(tok(["a great movie", "awful"], return_tensors="pt", padding=True))
    model = deltatune.attach(deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2), {"method": method, "modules_to_save": ["classifier"]})
    randomize_delta(model, std=0.05)
    out = logits(model, **batch)
    assert out.shape == (2, 2)
    model.save_delta(tmp_path / "d")
    fresh = deltatune.load_model("minilm-l6", task="sequence-classification", num_labels=2)
    assert torch.equal(logits(deltatune.load_delta(fresh, tmp_path / "d"), **batch), out)


@pytest.mark.parametrize(("delta", "exact_match"), [
    ("method: prefix_tuning\n  num_virtual_tokens: 4\n  projection_size: 16", 0.5),  # learns to answer "7"
    ("method: prompt_tuning\n  num_virtual_tokens: 4", 0.0),  # 4 input embeddings do not sway a random 2-layer model in 10 steps
])
def test_trainer_learns_and_generates(delta, exact_match, tmp_path):
    """The plain training loop (chunked LM loss on the backbone, generation-based eval) with a virtual-token delta."""
    from deltatune.train.config import load_recipe
    from deltatune.train.loop import train
    from tests.helpers import greedy_exact_match, save_tiny_lm, write_constant_answer_task

    lm = save_tiny_lm(tmp_path / "lm")
    train_path, eval_path, rows = write_constant_answer_task(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  name: {lm}\ndelta:\n  {delta}\n"
        f"data:\n  template: plain\n  path: {train_path}\n  eval_path: {eval_path}\noptim:\n  lr: 0.2\ntrain:\n  max_steps: 10\n  batch_size: 8\n  progress: false\n"
        f"eval:\n  metric: exact_match\n  max_new_tokens: 3\n  before_training: true\noutput:\n  dir: {tmp_path}\n  name: run\n"
    )
    result = train(load_recipe(recipe, []))
    assert result["after"]["loss"] < result["before"]["loss"]
    loaded = deltatune.load_delta(deltatune.load_model(lm), tmp_path / "run" / "adapter")
    assert loaded.delta_configs["default"].num_virtual_tokens == 4
    # The reported score is the saved delta's, scored here one prompt at a time through its generate().
    assert result["after"]["exact_match"] == greedy_exact_match(loaded, deltatune.load_tokenizer(lm), rows, max_new_tokens=3) == exact_match
