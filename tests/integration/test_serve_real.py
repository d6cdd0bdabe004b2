"""The serving engine on the real SmolLM2-135M-Instruct: a mixed-adapter batch, token for token as `deltatune generate`."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.generation import SamplingParams as GenerateParams
from deltatune.generation import generate_text
from deltatune.serve import Engine, SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "1, 2, 3, 4,"]
ADAPTERS = ["qv", None, "all", "qv"]
CHAT = [False, False, True, False]
NEW = 12


def test_mixed_adapter_batch_equals_generate_on_smollm2(tmp_path):
    adapters = tmp_path / "adapters"
    dm = deltatune.DeltaModel.of(deltatune.load_model(MODEL))
    g = torch.Generator().manual_seed(0)
    for name, r, targets in [("qv", 8, ["q_proj", "v_proj"]), ("all", 16, "all-linear")]:
        dm.attach(deltatune.LoraConfig(r=r, alpha=2 * r, targets=targets), name=name)
        with torch.no_grad():
            for p in dm.delta_parameters(name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        dm.save_delta(str(adapters / name), name)
    tokenizer = deltatune.load_tokenizer(MODEL)
    expected, base_text = [], None
    for p, a, chat in zip(PROMPTS, ADAPTERS, CHAT):
        if a is None:
            with dm.disable():
                expected.append(generate_text(dm, tokenizer, p, GenerateParams(max_new_tokens=NEW), chat=chat))
        else:
            dm.set_active(a)
            expected.append(generate_text(dm, tokenizer, p, GenerateParams(max_new_tokens=NEW), chat=chat))
    with dm.disable():
        base_text = generate_text(dm, tokenizer, PROMPTS[0], GenerateParams(max_new_tokens=NEW))
    assert base_text != expected[0]  # the adapters change SmolLM2's answers, so agreement below means something

    # fp32 adapters (the default) must agree token for token; bf16 adapters (fp32 arithmetic on rounded
    # weights) are checked to agree on these prompts too.
    for lora_dtype in ("auto", "bfloat16"):
        engine = Engine(deltatune.load_model(MODEL), adapters, tokenizer, max_batch=4, max_len=256, lora_slots=2, prefill_budget=16,
                        lora_dtype=lora_dtype)
        # The chat request goes in as a message list (the server's path), beside plain prompts, in one batch.
        reqs = [engine.submit([{"role": "user", "content": p}] if chat else p, a, SamplingParams(max_tokens=NEW), chat=chat)
                for p, a, chat in zip(PROMPTS, ADAPTERS, CHAT)]
        while not all(r.done.is_set() for r in reqs):
            engine.step()
        assert [r.text for r in reqs] == expected, lora_dtype
        engine.close()
