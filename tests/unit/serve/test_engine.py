"""Engine: mixed-adapter batches give exactly what `deltatune generate` gives per request."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.generation import SamplingParams as GenerateParams
from deltatune.generation import generate_text
from deltatune.serve import AdapterNotFoundError, Engine, RequestError, SamplingParams
from deltatune.utils.errors import ConfigError

PROMPTS = ["one two three", "the cat sat on the mat and the dog sat on the mat", "what is two plus two ?", "dog", "five six"]
ADAPTERS = ["qv4", None, "all8", "down2", "all8"]


def _reference(base, adapters_dir, prompt, adapter, max_new_tokens):
    model = deltatune.load_model(base, task="causal-lm")
    if adapter:
        model = deltatune.load_delta(model, adapters_dir / adapter)
    return generate_text(model, deltatune.load_tokenizer(base), prompt, GenerateParams(max_new_tokens=max_new_tokens))


@pytest.fixture
def engine(served):
    base, adapters = served
    eng = Engine(deltatune.load_model(base, task="causal-lm"), adapters, deltatune.load_tokenizer(base), max_batch=3, lora_slots=2, max_lora_rank=8,
                 prefill_budget=5, max_len=64)
    yield eng
    eng.close()


def test_mixed_adapter_batch_equals_deltatune_generate_per_request(served, engine):
    base, adapters = served
    expected = [_reference(base, adapters, p, a, 10) for p, a in zip(PROMPTS, ADAPTERS)]
    # 5 requests through 3 KV slots and 2 adapter slots for 3 adapters, prompts prefilled 5 tokens per step:
    # queueing, eviction and chunked prefill all happen while rows with different adapters share forwards.
    out = engine.generate(PROMPTS, ADAPTERS, SamplingParams(max_tokens=10))
    assert [o.text for o in out] == expected
    assert all(o.finish_reason == "length" and len(o.token_ids) == 10 for o in out)
    # The adapters matter: each changes the base model's output for the same prompt.
    base_out = engine.generate([PROMPTS[0]] * 3, [None, "qv4", "all8"], SamplingParams(max_tokens=10))
    assert len({o.text for o in base_out}) == 3
    m = engine.metrics()
    assert m["kv_slots_free"] == 3 and m["running"] == 0 and m["queue_length"] == 0
    assert m["adapter_evictions"] >= 1 and m["resident_adapters"] == 2 and engine.pool.refs == [0, 0]


def test_sampling_is_seeded_per_request_and_top_k_1_is_greedy(engine):
    hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    a = engine.generate(["one two", "one two"], ["all8", None], [hot, hot])
    b = engine.generate(["one two", "one two"], ["all8", None], [hot, hot])
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    others = {tuple(engine.generate(["one two"], ["all8"], SamplingParams(max_tokens=12, temperature=1.5, seed=s))[0].token_ids) for s in range(4)}
    assert len(others) > 1
    greedy = engine.generate(["one two"], ["all8"], SamplingParams(max_tokens=8))[0]
    top1 = engine.generate(["one two"], ["all8"], SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=3))[0]
    tiny_p = engine.generate(["one two"], ["all8"], SamplingParams(max_tokens=8, temperature=2.0, top_p=1e-6, seed=3))[0]
    assert top1.token_ids == greedy.token_ids == tiny_p.token_ids


def test_stop_strings_end_the_text_before_the_stop(engine):
    full = engine.generate(["one two three"], ["qv4"], SamplingParams(max_tokens=10))[0].text
    words = full.split()
    stop = words[3]
    out = engine.generate(["one two three"], ["qv4"], SamplingParams(max_tokens=10, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text and full.startswith(out.text) and out.text == full[: full.index(stop)]


def test_streamed_pieces_add_up_to_the_text(engine):
    events = []
    req = engine.submit("the cat", "down2", SamplingParams(max_tokens=6), on_event=events.append)
    while not req.done.is_set():
        engine.step()
    assert "".join(e.get("text", "") for e in events) == req.text and events[-1]["finish_reason"] == "length"


def test_bad_requests_fail_before_queueing(engine):
    with pytest.raises(RequestError, match="exceeds this engine's 64 tokens"):
        engine.submit("one two", None, SamplingParams(max_tokens=63))
    with pytest.raises(AdapterNotFoundError, match="not found"):
        engine.submit("one", "nope")
    with pytest.raises(AdapterNotFoundError, match="not a directory name inside"):
        engine.submit("one", "../base")
    with pytest.raises(RequestError, match="empty"):
        engine.submit("")
    with pytest.raises(RequestError, match="no chat template"):
        engine.submit([{"role": "user", "content": "hi"}])
    assert engine.metrics()["queue_length"] == 0


def test_background_loop_and_close_restore_the_model(served):
    base, adapters = served
    model = deltatune.load_model(base, task="causal-lm")
    keys = list(model.state_dict())
    eng = Engine(model, adapters, deltatune.load_tokenizer(base), max_batch=4, max_len=32)
    eng.start()
    out = eng.generate(["one", "two"], ["all8", None], SamplingParams(max_tokens=4))
    assert [len(o.token_ids) for o in out] == [4, 4]
    eng.close()
    assert list(model.state_dict()) == keys and not any(type(m).__name__ == "DeltaWrapper" for m in model.modules())


def test_engine_without_adapters_dir_does_not_wrap(served):
    base, _ = served
    model = deltatune.load_model(base, task="causal-lm")
    eng = Engine(model, None, deltatune.load_tokenizer(base), max_len=32)
    assert not any(type(m).__name__ == "DeltaWrapper" for m in model.modules())
    expected = _reference(base, None, "one two", None, 6)
    assert eng.generate(["one two"], sampling=SamplingParams(max_tokens=6))[0].text == expected
    with pytest.raises(AdapterNotFoundError):
        eng.submit("one", "qv4")


def test_cancelled_requests_free_their_slots(engine):
    running = engine.submit("one two three four", "all8", SamplingParams(max_tokens=20))
    while running.kv_slot is None:  # the adapter loads in the background first
        engine.step()
    assert running.kv_slot is not None and engine.pool.refs[running.lora_slot] == 1
    slot = running.lora_slot
    waiting = [engine.submit("dog", None, SamplingParams(max_tokens=20)) for _ in range(3)]  # 2 KV slots left: the last one queues
    engine.step()
    assert engine.metrics()["queue_length"] == 1
    engine.cancel(running)
    engine.cancel(waiting[-1])
    engine.step()
    assert running.finish_reason == waiting[-1].finish_reason == "cancelled" and running.done.is_set()
    assert engine.pool.refs[slot] == 0 and engine.metrics()["queue_length"] == 0
    while not all(r.done.is_set() for r in waiting[:2]):
        engine.step()
    assert engine.metrics()["kv_slots_free"] == 3


def test_many_adapters_through_two_slots(served, tmp_path):
    import shutil

    base, adapters = served
    for i in range(40):
        shutil.copytree(adapters / "qv4", tmp_path / f"copy{i:02d}")
    eng = Engine(deltatune.load_model(base, task="causal-lm"), tmp_path, deltatune.load_tokenizer(base), max_batch=3, lora_slots=2, max_len=32)
    before = eng.pool.nbytes()
    out = eng.generate(["one two"] * 40, [f"copy{i:02d}" for i in range(40)], SamplingParams(max_tokens=4))
    m = eng.metrics()
    assert m["adapter_loads"] == 40 and m["resident_adapters"] == 2 and eng.pool.nbytes() == before
    # Every copy holds qv4's weights, so every answer is qv4's answer.
    assert {o.text for o in out} == {_reference(base, adapters, "one two", "qv4", 4)}
    eng.close()


def test_adapters_kept_in_bfloat16_take_half_the_memory_and_give_the_same_greedy_tokens(served):
    base, adapters = served
    tokens, nbytes = {}, {}
    for dtype in ("auto", "bfloat16"):
        eng = Engine(deltatune.load_model(base, task="causal-lm"), adapters, deltatune.load_tokenizer(base), max_batch=5, lora_slots=3,
                     max_lora_rank=8, max_len=64, lora_dtype=dtype)
        tokens[dtype] = [o.token_ids for o in eng.generate(PROMPTS, ADAPTERS, SamplingParams(max_tokens=10))]
        nbytes[dtype] = eng.pool.nbytes()
        assert eng.pool.A["model.layers.0.self_attn.q_proj"].dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        eng.close()
    assert nbytes["bfloat16"] * 2 == nbytes["auto"]
    assert tokens["bfloat16"] == tokens["auto"]


def test_an_unknown_lora_dtype_is_refused_by_name(served):
    base, adapters = served
    with pytest.raises(ConfigError, match="lora_dtype 'int4'.*bfloat16"):
        Engine(deltatune.load_model(base, task="causal-lm"), adapters, deltatune.load_tokenizer(base), lora_dtype="int4")
