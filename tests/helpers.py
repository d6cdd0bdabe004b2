"""Helpers shared by tests (tiny configs, delta randomisation)."""
from __future__ import annotations

import torch


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


def randomize_delta(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every delta parameter non-trivial values (fresh LoRA has B = 0, i.e. no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
