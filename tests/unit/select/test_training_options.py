"""Training-time options: ssToken-style token selection and EDA augmentation."""
from __future__ import annotations

import random

import torch

from deltatune.data.config import AugmentConfig
from deltatune.select.augment import augment_records, eda, wordnet_available
from deltatune.select.token_select import TokenSelector, selection_mask, token_losses


def test_selection_mask_keeps_tokens_with_excess_loss():
    labels = torch.tensor([[5, 6, 7, 8, -100]])
    current = torch.tensor([[9.0, 2.0, 1.0, 3.0, 9.0]])
    history = torch.tensor([[0.0, 1.0, 2.0, 3.5, 0.0]])
    assert selection_mask(current, history, labels).tolist() == [[False, True, False, False, False]]
    assert selection_mask(current, history, labels, keep_ratio=0.5).tolist() == [[False, True, False, True, False]]
    same = selection_mask(current, current, labels)  # no excess anywhere (first step): keep every target
    assert same.tolist() == [[False, True, True, True, False]]


def test_token_selector_uses_the_ema_history_and_restores_weights(tiny_llama):
    model = tiny_llama
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.lm_head.weight
    head.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    selector = TokenSelector(model, beta=0.5, keep_ratio=None)
    before = head.detach().clone()
    with torch.no_grad():
        head.add_(0.05 * torch.randn(head.shape, generator=g))  # the "current" model moves away from its history
    current = token_losses(model, batch)
    with selector.history_weights(model):
        assert torch.equal(model.lm_head.weight, before)
        history = token_losses(model, batch)
    assert not torch.equal(head, before)
    out = selector(model, batch)
    expected = (current - history)[:, 1:] > 0
    assert torch.equal(out["labels"][:, 1:] != -100, expected)
    assert torch.equal(out["labels"][:, 1:][expected], ids[:, 1:][expected])
    assert selector.kept_fraction == float(expected.sum()) / 16
    moved = head.detach().clone()
    selector.update(model)
    assert torch.allclose(selector.history["lm_head.weight"], 0.5 * before + 0.5 * moved)


def test_eda_operations_are_seeded_and_keep_words_of_the_example():
    text = "the film is a quiet and moving portrait of a family"
    words = set(text.split())
    for op in ("insert", "swap", "delete"):
        a, b = eda(text, op, 0.2, random.Random(3)), eda(text, op, 0.2, random.Random(3))
        assert a == b and a != text
        assert set(a.split()) <= words
    assert len(eda(text, "insert", 0.2, random.Random(0)).split()) == 13  # int(0.2 * 11) = 2 words inserted
    assert sorted(eda(text, "swap", 0.2, random.Random(0)).split()) == sorted(text.split())
    assert len(eda(text, "delete", 0.2, random.Random(0)).split()) < 11
    if not wordnet_available():  # without WordNet data, synonym replacement is random insertion
        assert eda(text, "synonym", 0.2, random.Random(5)) == eda(text, "insert", 0.2, random.Random(5))


def test_augment_records_keeps_labels_and_originals():
    rows = [{"text": "a great movie overall", "label": 1}, {"text": "dull and slow", "label": 0}]
    out = augment_records(rows, AugmentConfig(copies=3, ops=["swap", "delete", "insert"], seed=1))
    assert out[:2] == rows and len(out) == 8
    assert [r["label"] for r in out[2:]] == [1, 1, 1, 0, 0, 0]
    assert out == augment_records(rows, AugmentConfig(copies=3, ops=["swap", "delete", "insert"], seed=1))
    assert out != augment_records(rows, AugmentConfig(copies=3, ops=["swap", "delete", "insert"], seed=2))
