"""The server under bad adapters and hostile clients, over HTTP on 127.0.0.1.

A malformed adapter fails only its own requests (and may be retried); every size a client controls
is bounded; a disconnect cancels the generation; nothing a client sends gives a 5xx or a hang; no
answer reveals a server path. The fuzz run is bounded in count and time and stops by itself.
"""
from __future__ import annotations

import gc
import http.client
import json
import random
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.serve.local import local_server
from tests.helpers import randomize_delta

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

KEY = "robust-key"
MAX_BODY = 32 * 1024
TIMEOUT = 30


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    from deltatune.serve.api import create_app
    from deltatune.serve.engine import Engine

    base, adapters = served
    root = tmp_path_factory.mktemp("robust") / "adapters"
    shutil.copytree(adapters / "qv4", root / "good")
    # An incremental LoRA whose rank mask has the wrong shape: the case that used to leak a slot.
    model = deltatune.attach(deltatune.load_model(base, task="causal-lm"),
                             {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "rank_allocation": "incremental", "initial_r": 2, "total_r": 8})
    randomize_delta(model, std=0.3)
    model.save_delta(root / "badmask")
    tensors = load_file(str(root / "badmask" / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_rank_mask")]:
        tensors[key] = torch.ones(3)
    save_file(tensors, str(root / "badmask" / "adapter_model.safetensors"))
    ia3 = deltatune.attach(deltatune.load_model(base, task="causal-lm"), {"method": "ia3", "targets": ["q_proj"], "feedforward": []})
    ia3.save_delta(root / "ia3")
    tok = deltatune.load_tokenizer(base)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    engine = Engine(deltatune.load_model(base, task="causal-lm"), root, tok, max_batch=4, max_len=48, lora_slots=2, max_lora_rank=8, name="tiny")
    with local_server(create_app(engine, KEY, max_body_bytes=MAX_BODY)) as port:
        yield port, engine, str(root.parent)


def post(port, path, body, key=KEY, headers=None, timeout=TIMEOUT):
    """(status, headers, text) of one POST; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def get(port, path, key=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def completion(model, **extra):
    return {"model": model, "prompt": "the cat sat", "max_tokens": 4, "temperature": 0, **extra}


def test_a_bad_adapter_fails_only_its_own_requests_and_leaks_no_slot(server):
    port, engine, secret = server
    solo = json.loads(post(port, "/v1/completions", completion("good"))[2])["choices"][0]["text"]
    models = ["badmask", "good"] * 4 + ["ia3", "tiny"]
    with ThreadPoolExecutor(len(models)) as ex:
        results = list(ex.map(lambda m: (m, post(port, "/v1/completions", completion(m))), models))
    for model, (status, _, text) in results:
        assert secret not in text, f"{model}: the answer reveals the server's path: {text}"
        if model in ("badmask", "ia3"):
            error = json.loads(text)["error"]
            assert status == 400 and error["code"] == "adapter_load_failed" and error["param"] == "model", text
            assert ("lora_rank_mask" if model == "badmask" else "method 'ia3' cannot be served") in error["message"]
        else:
            assert status == 200, text
            if model == "good":
                assert json.loads(text)["choices"][0]["text"] == solo
    pool = engine.pool
    assert pool.pending() == 0 and len(pool.free) + len(pool.resident) == pool.num_slots
    assert "badmask" not in pool.resident and "ia3" not in pool.resident
    status, _, text = post(port, "/v1/completions", completion("badmask", stream=True))  # streaming: the error is an event
    assert status == 200 and "adapter_load_failed" in text and secret not in text and text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("body, expected", [
    (completion("tiny", seed=2**70), "seed"),
    (completion("tiny", seed=-1), "seed"),
    (completion("ti\x00ny"), "control character"),
    (completion("x" * 300), "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 300}, "messages"),
    (completion("tiny", stop=["a", "b", "c", "d", "e"]), "stop"),
    (completion("tiny", stop="s" * 300), "stop"),
    (completion("tiny", n=2), "n"),
    (completion("tiny", max_tokens=10**30), "exceeds"),
    (completion("tiny", prompt="seven " * 1000), "characters"),
    (completion("tiny", temperature=float("nan")), "temperature"),
    (b'{"model": "tiny", "prompt": "\\ud800 lone surrogate"}', "surrogate"),
    (b'{"model": "tiny", "prompt": "a", "seed": ' + b"9" * 5000 + b"}", "JSON"),
    (b"[" * 5000 + b"]" * 5000, "JSON"),
    (b"\xff\xfe not utf-8", "JSON"),
])
def test_out_of_bounds_input_is_a_400_naming_the_field(server, body, expected):
    status, _, text = post(server[0], "/v1/completions" if b"messages" not in json.dumps(body, default=str).encode() else "/v1/chat/completions", body)
    assert status == 400 and expected in json.loads(text)["error"]["message"], text


def test_body_size_is_bounded_with_or_without_a_length_header(server):
    port = server[0]
    big = json.dumps(completion("tiny", prompt="a " * MAX_BODY)).encode()
    status, _, text = post(port, "/v1/completions", big)
    assert status == 413 and json.loads(text)["error"]["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)  # chunked: no Content-Length to trust
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(big), 8192):
        piece = big[i: i + 8192]
        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()


def test_a_full_queue_answers_429_with_retry_after(server):
    port, engine, _ = server
    engine.max_queue = 0
    try:
        status, headers, text = post(port, "/v1/completions", completion("tiny"))
    finally:
        engine.max_queue = 1024
    assert status == 429 and headers.get("retry-after") == "1" and json.loads(text)["error"]["code"] == "queue_full"


def test_docs_and_openapi_need_the_key(server):
    port = server[0]
    for path in ("/docs", "/openapi.json", "/metrics", "/v1/models"):
        assert get(port, path)[0] == 401 and get(port, path, KEY)[0] == 200
    assert get(port, "/health") == (200, '{"status":"ok"}')


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_disconnect_cancels_its_generation(server, stream):
    port, engine, _ = server
    before = engine.stats["cancelled"]
    with engine._lock:  # hold the engine between steps, so the request is still queued when the client leaves
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        body = json.dumps(completion("tiny", max_tokens=30, stream=stream)).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        sock.close()
        deadline = time.time() + 10
        while not any(r.cancelled for r in list(engine._incoming) + list(engine.scheduler.waiting)):
            assert time.time() < deadline, "the disconnect did not cancel the request"
            time.sleep(0.05)
    deadline = time.time() + 10
    while engine.stats["cancelled"] == before:
        assert time.time() < deadline, "the cancelled request was not retired"
        time.sleep(0.05)
    assert engine.kv.free_slots == engine.kv.num_slots


# --- fuzz ---------------------------------------------------------------------------------------
EDGE_STRINGS = ["", " ", "\x00", "\u202e", "\u200b", "🚀" * 50, "a" * 5000, "\\ud800", "é", "null", "../../etc/passwd", "%00", "tiny\n"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, 2**70, -(2**70), rng.randrange(-100, 100)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 1e-308, 3.7, float("inf"), float("nan")])
    if kind in (4, 5):
        return rng.choice(EDGE_STRINGS + ["tiny", "good", "badmask", "ia3"])
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["role", "content", "model", "x", ""]): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def fuzz_body(rng: random.Random) -> tuple[str, bytes]:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": rng.choice(["tiny", "good", "badmask"]), "max_tokens": rng.randrange(1, 6), "temperature": rng.choice([0, 0.7])}
    body.update({"messages": [{"role": "user", "content": "one two"}]} if chat else {"prompt": "one two"})
    shape = rng.randrange(6)
    if shape == 0:  # one field set to a random value of any type
        body[rng.choice(list(body) + ["stop", "seed", "top_p", "top_k", "n", "stream", "max_completion_tokens"])] = random_value(rng)
    elif shape == 1:  # a required field dropped
        body.pop(rng.choice(["model", "messages" if chat else "prompt"]))
    elif shape == 2:  # the whole body a random value
        body = random_value(rng)
    raw = json.dumps(body).encode()
    if shape == 3:  # truncated or byte-flipped JSON
        raw = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in raw)
    return path, raw


def streaming_disconnect(port, rng):
    """Open a stream, read its first bytes, and leave mid-stream."""
    body = json.dumps({"model": rng.choice(["tiny", "good"]), "prompt": "one two", "max_tokens": 20, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = sock.recv(64)
    return int(head.split()[1])


def test_fuzz_gives_no_5xx_no_hang_and_returns_its_memory(server):
    port, engine, secret = server
    rng = random.Random(1234)
    post(port, "/v1/completions", completion("good"))  # warm: first loads and allocations are not growth
    gc.collect()
    before = rss_mb()
    statuses, deadline = [], time.time() + 120
    cases = [("disconnect", None) if rng.random() < 0.1 else fuzz_body(rng) for _ in range(300)]

    def one(case):
        path, raw = case
        if path == "disconnect":
            return streaming_disconnect(port, random.Random(len(statuses))), ""
        status, _, text = post(port, path, raw)
        return status, text

    with ThreadPoolExecutor(8) as ex:
        for status, text in ex.map(one, cases):
            statuses.append(status)
            assert status < 500, f"a {status}: {text}"
            assert secret not in text
            assert time.time() < deadline, "the fuzz run took too long (a hang?)"
    assert len(statuses) == len(cases) and {200, 400} <= set(statuses)
    deadline = time.time() + 20
    while engine.queued() or engine.scheduler.running:
        assert time.time() < deadline, "requests still in the engine after the fuzz run"
        time.sleep(0.05)
    assert post(port, "/v1/completions", completion("good"))[0] == 200  # still serving
    gc.collect()
    assert rss_mb() - before < 200, f"RSS grew by {rss_mb() - before:.0f} MB"
