"""Incremental detokenization equals decoding the whole output, piece by piece, for the tokenizers we serve."""
from __future__ import annotations

import random

import pytest

import deltatune
from deltatune.serve.detokenize import IncrementalDecoder
from tests.helpers import tiny_tokenizer


def pieces(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    out = [decoder.step(ids[: i + 1]) for i in range(len(ids))]
    return out, decoder.flush(ids)


def check(tokenizer, ids, valid_text=True):
    out, rest = pieces(tokenizer, ids)
    assert "".join(out) + rest == tokenizer.decode(ids, skip_special_tokens=True)
    if valid_text:  # an incomplete character is held back, never streamed (random ids may hold invalid UTF-8 itself)
        assert all("\ufffd" not in p for p in out)


def test_word_level_tokenizer_with_spaces_between_tokens():
    tok = tiny_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        check(tok, [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))])


@pytest.mark.slow
def test_byte_level_bpe_with_multibyte_characters_and_special_tokens():
    tok = deltatune.load_tokenizer("smollm2-135m-instruct")
    texts = ["Grüße aus Köln — 東京 🚀🎉 done", "  two  spaces\nnew line\tTab", "naïve café, 12+34=46."]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        check(tok, ids)
        check(tok, [tok.eos_token_id, *ids, tok.eos_token_id])
    emoji = tok("🚀", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1  # one character over several tokens: the case that needs holding back
    out, rest = pieces(tok, emoji[:-1])
    assert "".join(out) == "" and rest == tok.decode(emoji[:-1])  # cut mid-character: the end shows as the full decode does
    rng = random.Random(1)
    for _ in range(10):
        check(tok, [rng.randrange(len(tok)) for _ in range(40)], valid_text=False)
