"""Shared fixtures: tiny in-code models (2 layers, hidden 32), offline hub, fixed seeds."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=128, max_position_embeddings=64, num_labels=3)
    cfg.update(overrides)
    return BertConfig(**cfg)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_bert_cls():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 10), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per session; tests must not mutate it."""
    import deltatune

    return deltatune.load_model("smollm2-135m-instruct"), deltatune.load_tokenizer("smollm2-135m-instruct")


def randomize_delta(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every delta parameter non-trivial values (fresh LoRA has B = 0, i.e. no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
