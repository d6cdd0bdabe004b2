"""The OpenAI-compatible server, driven by the official `openai` client against 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import json
import urllib.error
import urllib.request
import pytest

import deltatune
from deltatune.generation import SamplingParams as GenerateParams
from deltatune.generation import generate_text

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key-123"
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _http(url, body=None, key=None):
    """(status, text) of a raw GET (no body) or POST (bytes or a JSON-able body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}"} if key else {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def server(served):
    from deltatune.serve.api import create_app
    from deltatune.serve.engine import Engine

    base, adapters = served
    tok = deltatune.load_tokenizer(base)
    tok.chat_template = TEMPLATE
    engine = Engine(deltatune.load_model(base, task="causal-lm"), adapters, tok, max_batch=4, max_len=48, lora_slots=2, max_lora_rank=8, name="tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, KEY), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "all8", "down2", "qv4"]


def test_completion_with_adapter_equals_deltatune_generate(client, served):
    base, adapters = served
    model = deltatune.load_delta(deltatune.load_model(base, task="causal-lm"), adapters / "all8")
    expected = generate_text(model, deltatune.load_tokenizer(base), "the cat sat", GenerateParams(max_new_tokens=8))
    out = client.completions.create(model="all8", prompt="the cat sat", max_tokens=8, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.object == "text_completion"
    stream = client.completions.create(model="all8", prompt="the cat sat", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_chat_streaming_matches_the_whole_answer(client):
    messages = [{"role": "user", "content": "one two three"}]
    whole = client.chat.completions.create(model="qv4", messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model="qv4", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert base.choices[0].message.content != whole.choices[0].message.content


def test_concurrent_streams_with_different_adapters(client):
    models = ["tiny", "qv4", "all8", "down2"] * 3
    solo = {m: client.completions.create(model=m, prompt="what is two", max_tokens=6, temperature=0).choices[0].text for m in set(models)}

    def one(m):
        return m, "".join(c.choices[0].text for c in client.completions.create(model=m, prompt="what is two", max_tokens=6, temperature=0, stream=True))

    with ThreadPoolExecutor(len(models)) as ex:
        results = list(ex.map(one, models))
    assert all(text == solo[m] for m, text in results)


def test_errors_use_openai_shape_and_status(client, server):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt="one", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="../base", prompt="one", max_tokens=2)
    for bad in (-1, 0, 10**9):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="one", max_tokens=bad)
    with pytest.raises(openai.BadRequestError, match="exceeds this engine's 48 tokens"):
        client.completions.create(model="tiny", prompt="one " * 60, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    status, text = _http(url + "/v1/completions", b"{not json", KEY)
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, text = _http(url + "/v1/completions", {"model": "tiny", "prompt": "one", "max_tokens": "5"}, KEY)
    assert status == 400 and "max_tokens" in json.loads(text)["error"]["message"] and json.loads(text)["error"]["type"] == "invalid_request_error"
    status, text = _http(url + "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, KEY)
    assert status == 400 and "messages" in json.loads(text)["error"]["message"]
    assert _http(url + "/v1/completions", {"model": "tiny", "prompt": "one"})[0] == 401
    assert _http(url + "/health") == (200, '{"status":"ok"}')


def test_metrics_count_requests_and_adapters(client, server):
    client.completions.create(model="down2", prompt="one", max_tokens=3, temperature=0)
    status, text = _http(server[0] + "/metrics", key=KEY)
    values = dict(line.split() for line in text.strip().splitlines())
    assert float(values["deltatune_finished"]) >= 1 and float(values["deltatune_generated_tokens"]) >= 3
    assert 1 <= float(values["deltatune_resident_adapters"]) <= 2 and values["deltatune_queue_length"] == "0"
    assert status == 200 and _http(server[0] + "/metrics")[0] == 401
