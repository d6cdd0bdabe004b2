"""Offline tokenizers for the data tests: the shipped MiniLM (BERT WordPiece, no chat template)
and a tiny byte-level BPE with EOS/pad tokens and a chat template, built in code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def _minilm_dir() -> Path:
    from deltatune.models.aliases import resolve_alias

    try:
        return resolve_alias("minilm-l6")
    except Exception:  # package not installed: the tests that need it skip
        return Path("/nonexistent")


MINILM_DIR = _minilm_dir()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "hello world this is a test of the tokenizer",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital.",
]


@pytest.fixture(scope="session")
def bert_tokenizer():
    if not MINILM_DIR.is_dir():
        pytest.skip(f"MiniLM tokenizer not installed at {MINILM_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MINILM_DIR))


def _bpe_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Byte-level BPE, vocab ≈ 320, EOS "</s>" = 2, pad = 0, chat template with <|role|>…<|end|>."""
    return _bpe_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same BPE without a chat template (a base model's tokenizer)."""
    return _bpe_tokenizer(None)

