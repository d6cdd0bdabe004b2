"""General-text loss of a tuned model against its base, computed independently."""
import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.evaluation.retention import base_context, general_text_retention, text_loss
from deltatune.utils.errors import DataError
from tests.helpers import randomize_delta, tiny_tokenizer


def direct_loss(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])))


def test_text_loss_is_the_mean_next_token_nll(tiny_llama, tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "general.txt"
    text.write_text("one two three\nthe cat sat\n")
    ids = tok("one two three\n", add_special_tokens=False)["input_ids"] + tok("the cat sat\n", add_special_tokens=False)["input_ids"]
    result = text_loss(tiny_llama, tok, text, block_size=64)
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(direct_loss(tiny_llama, ids), rel=1e-5)


def test_forgetting_is_tuned_minus_base_on_the_same_text(tiny_llama, tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "general.txt"
    text.write_text("one two three four\n" * 3)
    ids = tok("one two three four\n" * 3, add_special_tokens=False)["input_ids"]
    base_loss = direct_loss(tiny_llama, ids)
    model = deltatune.attach(tiny_llama, {"method": "lora", "r": 2})
    randomize_delta(model, std=0.5)
    tuned_loss = direct_loss(model, ids)
    result = general_text_retention(model, tok, text)
    assert result["base_loss"] == pytest.approx(base_loss, rel=1e-5) and result["loss"] == pytest.approx(tuned_loss, rel=1e-5)
    assert result["forgetting"] == pytest.approx(tuned_loss - base_loss, rel=1e-4) and result["forgetting"] != 0


def test_bad_text_files_are_named(tiny_llama, tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match="does not exist"):
        text_loss(tiny_llama, tok, tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="bin.txt: not UTF-8"):
        text_loss(tiny_llama, tok, tmp_path / "bin.txt")
    with pytest.raises(DataError, match="base model"):  # a model without deltas has no base to disable to
        base_context(torch.nn.Linear(1, 1))
