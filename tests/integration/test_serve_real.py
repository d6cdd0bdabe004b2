"""The serving engine on the real SmolLM2-135M-Instruct: a mixed-adapter batch, token for token as `deltatune generate`."""
from __future__ import annotations

import pytest

import deltatune
from deltatune.generation import SamplingParams as GenerateParams
from deltatune.generation import generate_text
from deltatune.serve import Engine, SamplingParams
from tests.helpers import randomize_delta

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "1, 2, 3, 4,"]
ADAPTERS = ["qv", None, "all", "qv"]
CHAT = [False, False, True, False]


def test_mixed_adapter_batch_equals_generate_on_smollm2(tmp_path):
    adapters = tmp_path / "adapters"
    for i, (name, r, targets) in enumerate([("qv", 8, ["q_proj", "v_proj"]), ("all", 16, "all-linear")]):
        dm = deltatune.attach(deltatune.load_model(MODEL), deltatune.LoraConfig(r=r, alpha=2 * r, targets=targets))
        randomize_delta(dm, std=0.02, seed=i)
        dm.save_delta(adapters / name)
    tokenizer = deltatune.load_tokenizer(MODEL)
    expected = {}
    for name in ("qv", "all", None):
        model = deltatune.load_model(MODEL)
        if name:
            model = deltatune.load_delta(model, adapters / name)
        for p, a, chat in zip(PROMPTS, ADAPTERS, CHAT):
            if a == name:
                expected[p] = generate_text(model, tokenizer, p, GenerateParams(max_new_tokens=16), chat=chat)
    engine = Engine(deltatune.load_model(MODEL), adapters, tokenizer, max_batch=4, max_len=256, lora_slots=2, prefill_budget=16)
    # The chat request goes in as a message list (the server's path); the others as plain prompts.
    prompts = [[{"role": "user", "content": p}] if chat else p for p, chat in zip(PROMPTS, CHAT)]
    plain = engine.generate([p for p, c in zip(prompts, CHAT) if not c], [a for a, c in zip(ADAPTERS, CHAT) if not c], SamplingParams(max_tokens=16))
    chat = engine.generate([p for p, c in zip(prompts, CHAT) if c], [a for a, c in zip(ADAPTERS, CHAT) if c], SamplingParams(max_tokens=16), chat=True)
    got = iter(plain)
    got_chat = iter(chat)
    texts = [next(got_chat).text if c else next(got).text for c in CHAT]
    assert texts == [expected[p] for p in PROMPTS]
    # The adapters change SmolLM2's answers (otherwise the comparison above would prove little).
    base = engine.generate([PROMPTS[0], PROMPTS[0]], [None, "qv"], SamplingParams(max_tokens=16))
    assert base[0].text != base[1].text
    engine.close()
