"""The engine on a GPU: the same tokens as `deltatune generate` on that GPU. Skipped without CUDA
(CI has none); run where one is lent: ``pytest tests/unit/serve/test_engine_cuda.py``."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.generation import SamplingParams as GenerateParams
from deltatune.generation import generate_text
from deltatune.serve import Engine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["one two three", "the cat sat on the mat and the dog sat on the mat", "what is two plus two ?", "dog", "five six"]
ADAPTERS = ["qv4", None, "all8", "down2", "all8"]


def _on_gpu(base, adapters_dir=None, adapter=None):
    model = deltatune.load_model(base, task="causal-lm").to("cuda")
    return deltatune.load_delta(model, adapters_dir / adapter) if adapter else model


def test_mixed_batch_on_gpu_equals_generate_on_gpu(served):
    base, adapters = served
    tok = deltatune.load_tokenizer(base)
    expected = [generate_text(_on_gpu(base, adapters, a), tok, p, GenerateParams(max_new_tokens=10)) for p, a in zip(PROMPTS, ADAPTERS)]
    engine = Engine(_on_gpu(base), adapters, tok, max_batch=3, lora_slots=2, max_lora_rank=8, prefill_budget=5, max_len=64)
    try:
        assert engine.kv.k.is_cuda and engine.pool.A["model.layers.0.self_attn.q_proj"].is_cuda
        out = engine.generate(PROMPTS, ADAPTERS, SamplingParams(max_tokens=10))
        assert [o.text for o in out] == expected
        # Seeded sampling draws on the CPU: the same seed gives the same tokens twice.
        hot = SamplingParams(max_tokens=8, temperature=1.5, seed=5)
        assert engine.generate(["one two"], ["all8"], hot)[0].token_ids == engine.generate(["one two"], ["all8"], hot)[0].token_ids
    finally:
        engine.close()
