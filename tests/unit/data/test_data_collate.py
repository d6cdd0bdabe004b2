"""Padding and packing: shapes, values, and packed loss == unpacked loss on a tiny llama."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.data import PackedCollator, PadCollator, block_causal_mask, pack_examples


def lm_example(ids, n_prompt=0):
    return {"input_ids": list(ids), "labels": [-100] * n_prompt + list(ids[n_prompt:])}


def test_pad_collator_lm_and_classification():
    batch = PadCollator(pad_id=0)([lm_example([5, 6, 7], 1), lm_example([8, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    cls = PadCollator(pad_id=0, pad_to_multiple_of=4)(
        [
            {"input_ids": [1, 2], "attention_mask": [1, 1], "token_type_ids": [0, 1], "label": 2},
            {"input_ids": [3], "attention_mask": [1], "token_type_ids": [0], "label": 0},
        ]
    )
    assert cls["input_ids"].shape == (2, 4)
    assert cls["token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert cls["labels"].tolist() == [2, 0] and cls["labels"].dtype == torch.long


def test_pack_examples_best_fit():
    lengths = [6, 5, 3, 4, 2, 1]
    examples = [lm_example(list(range(10 * i, 10 * i + n))) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, max_length=8)
    # 6 → row0 (room 2); 5 → row1 (room 3); 3 → row1 (room 0); 4 → row2 (room 4); 2 → row0 (tightest); 1 → row2.
    assert [r["lengths"] for r in rows] == [[6, 2], [5, 3], [4, 1]]
    assert rows[0]["input_ids"] == [0, 1, 2, 3, 4, 5, 40, 41]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    # First position of every example is -100: no target crosses an example boundary.
    assert rows[0]["labels"] == [-100, 1, 2, 3, 4, 5, -100, 41]
    with pytest.raises(ValueError, match="does not fit max_length=4"):
        pack_examples(examples, max_length=4)


def test_block_causal_mask_values():
    mask = block_causal_mask([[2, 1]], seq_len=4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # example 2 sees only itself
        [0, 0, 0, 1],  # padding is its own segment: no fully blocked row
    ]
    assert mask[0, 0, 0, 1].item() == torch.finfo(torch.float32).min
    assert block_causal_mask([[1]], 1, torch.bfloat16).dtype == torch.bfloat16


def make_tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def per_token_loss(logits, labels):
    """[B, S] loss of position j's target labels[j], predicted at j-1 (0 where ignored / j = 0)."""
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none")
    return F.pad(loss, (1, 0))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked(attn):
    model = make_tiny_llama(attn)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5, 4, 6, 2]
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        examples.append(lm_example(ids, n_prompt=i % 3))  # some with masked prompts

    with torch.no_grad():
        unpacked = PadCollator(pad_id=0)(examples)
        out = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"])
        expected = per_token_loss(out.logits, unpacked["labels"]).sum(dim=1)  # [num_examples]

        rows = pack_examples(examples, max_length=12)
        assert len(rows) < len(examples)
        batch = PackedCollator(pad_id=0)(rows)
        assert batch["attention_mask"].shape == (len(rows), 1, 12, 12)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        tok_loss = per_token_loss(out.logits, batch["labels"])

    # Sum each packed example's token losses; match them to the unpacked examples by content.
    got = {}
    for b, row_lengths in enumerate(batch["lengths"]):
        start = 0
        for n in row_lengths:
            key = tuple(batch["input_ids"][b, start : start + n].tolist())
            got[key] = tok_loss[b, start : start + n].sum()
            start += n
    assert len(got) == len(examples)
    for i, ex in enumerate(examples):
        torch.testing.assert_close(got[tuple(ex["input_ids"])], expected[i], atol=1e-5, rtol=0)
    # Control: with a plain causal mask the examples see each other and the losses change.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long())
    total_leaky = per_token_loss(leaky.logits, batch["labels"]).sum()
    assert abs(total_leaky - expected.sum()).item() > 1e-3
