"""OpenAI-compatible HTTP server over an :class:`~deltatune.serve.engine.Engine` (FastAPI).

``model`` in a request names the base model (no adapter) or an adapter directory under the
engine's adapters dir (loaded on first use). Errors use OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``: 400 bad input (an adapter that fails its checks
included), 401 missing/wrong bearer key, 404 unknown model, 413 body over ``max_body_bytes``, 429 queue
full (with ``Retry-After``), 500 a generic message (the detail goes to the server's log, never to the
client). Streaming answers are server-sent events of OpenAI chunk objects ending in ``data: [DONE]``.
A client that disconnects, streaming or not, has its generation cancelled and its slot freed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from deltatune.serve.adapter_pool import AdapterNotFoundError
from deltatune.serve.engine import Engine
from deltatune.serve.errors import EngineError, QueueFullError
from deltatune.serve.protocol import ChatRequest, CompletionRequest
from deltatune.serve.sampling import SamplingParams
from deltatune.utils.errors import DeltatuneError

DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there

log = logging.getLogger("deltatune.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param, self.headers = status, message, type_, code, param, headers


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status, headers=headers)


def _generation_error(err: BaseException) -> ApiError:
    """A request that failed inside the engine: an adapter that failed its checks is the client's
    to fix (400, its sanitized reason); anything else is ours (500, a generic message)."""
    if isinstance(err, DeltatuneError) and not isinstance(err, EngineError):
        return ApiError(400, f"the request's model cannot be served: {err}", code="adapter_load_failed", param="model")
    return ApiError(500, "internal error while generating; see the server log", "server_error")


def _check_text(value, where: str = "body") -> None:
    """Every string must be encodable (a lone surrogate from JSON's \\ud800 would fail deep in the tokenizer)."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{at}: the string holds an unpaired UTF-16 surrogate") from None
        elif isinstance(item, dict):
            stack.extend((v, f"{at}.{k}") for k, v in item.items())
            stack.extend((k, at) for k in item)
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))


def _validation_message(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "list[", "union[")) and p not in ("str", "int", "float", "bool"))
        parts.append(f"{loc or 'body'}: {e['msg']}")
    return "; ".join(dict.fromkeys(parts))


class ApiKeyMiddleware:
    """Every path but ``/health`` needs ``Authorization: Bearer <key>``. Plain ASGI rather than
    ``@app.middleware``: Starlette's BaseHTTPMiddleware hides a client's disconnect from the endpoint."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not given or not hmac.compare_digest(given, self.key):
                response = _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "authentication_error", "invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; starts the engine's background loop with the app and closes it at shutdown.

    With ``api_key`` every path but ``/health`` needs it, ``/docs`` and ``/openapi.json`` included."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="deltatune", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error(err.status, err.message, err.type, err.code, err.param, err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=err)
        return _error(500, "internal error; see the server log", "server_error")

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        lines = [f"deltatune_{k} {float(v):g}" for k, v in engine.metrics().items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models():
        base = {"id": engine.name, "object": "model", "created": created, "owned_by": "deltatune"}
        adapters = [{"id": n, "object": "model", "created": created, "owned_by": "deltatune", "parent": engine.name}
                    for n in (engine.pool.names() if engine.pool else [])]
        return {"object": "list", "data": [base, *adapters]}

    async def _read_body(request: Request) -> bytes:
        too_large = ApiError(413, f"request body is larger than this server's limit of {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"invalid Content-Length header {declared[:32]!r}")
            if int(declared) > max_body_bytes:
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no length header
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(request: Request, cls):
        body = await _read_body(request)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an over-long integer, deep nesting
            raise ApiError(400, f"request body is not valid JSON ({type(err).__name__})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        _check_text(data)
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as err:
            raise ApiError(400, _validation_message(err)) from None

    async def _submit(body, prompt, chat: bool, on_event):
        adapter = None if body.model == engine.name else body.model
        try:
            sampling = SamplingParams(max_tokens=body.limit(DEFAULT_MAX_TOKENS), temperature=float(body.temperature), top_p=float(body.top_p),
                                      top_k=body.top_k, seed=body.seed, stop=tuple(body.stop or ()))
            # Tokenizing a long prompt takes a while: off the event loop, so other clients are served meanwhile.
            return await asyncio.to_thread(engine.submit, prompt, adapter, sampling, on_event=on_event, chat=chat)
        except AdapterNotFoundError as err:
            raise ApiError(404, f"model {body.model!r} does not exist: {err}", code="model_not_found", param="model") from None
        except QueueFullError as err:
            raise ApiError(429, str(err), "rate_limit_error", "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except (DeltatuneError, pydantic.ValidationError) as err:
            raise ApiError(400, str(err)) from None

    async def _finished(request: Request, req, events: asyncio.Queue) -> dict:
        """Wait for ``req``'s last event; cancel it if the client goes away meanwhile."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected") from None
                    continue
                if "finish_reason" in ev:
                    return ev
        finally:
            if not req.done.is_set():
                engine.cancel(req)

    async def _run(request: Request, cls, chat: bool):
        body = await _parse(request, cls)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        prompt = [m.model_dump() for m in body.messages] if chat else body.prompt
        req = await _submit(body, prompt, chat, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(_stream(req, events, rid, body.model, chat), media_type="text/event-stream")
        ev = await _finished(request, req, events)
        if ev["error"] is not None:
            raise _generation_error(ev["error"])
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids), "total_tokens": len(req.prompt_ids) + len(req.output_ids)}
        choice = {"index": 0, "finish_reason": req.finish_reason}
        choice.update({"message": {"role": "assistant", "content": req.text}} if chat else {"text": req.text, "logprobs": None})
        return {"id": rid, "object": obj, "created": int(time.time()), "model": body.model, "choices": [choice], "usage": usage}

    async def _stream(req, events: asyncio.Queue, rid: str, model: str, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                ev = await events.get()
                if "finish_reason" in ev:
                    if ev["error"] is not None:
                        err = _generation_error(ev["error"])
                        yield "data: " + json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}) + "\n\n"
                    else:
                        yield chunk(None, req.finish_reason)
                    break
                yield chunk(ev["text"], None)
            yield "data: [DONE]\n\n"
        finally:
            if not req.done.is_set():  # the client went away: stop generating for it
                engine.cancel(req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _run(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _run(request, ChatRequest, chat=True)

    return app
