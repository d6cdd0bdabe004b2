"""OpenAI-compatible HTTP server over an :class:`~deltatune.serve.engine.Engine` (FastAPI).

``model`` in a request names the base model (no adapter) or an adapter directory under the
engine's adapters dir (loaded on first use). Errors use OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 401 missing/wrong bearer key,
404 unknown model. Streaming answers are server-sent events of OpenAI chunk objects ending in
``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from deltatune.serve.adapter_pool import AdapterNotFoundError
from deltatune.serve.engine import Engine
from deltatune.serve.protocol import ChatRequest, CompletionRequest
from deltatune.serve.sampling import SamplingParams
from deltatune.utils.errors import DeltatuneError

DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _validation_message(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "list[", "union[")) and p not in ("str", "int", "float", "bool"))
        parts.append(f"{loc or 'body'}: {e['msg']}")
    return "; ".join(dict.fromkeys(parts))


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; starts the engine's background loop with the app and closes it at shutdown."""
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
        return _error(err.status, err.message, err.type, err.code, err.param)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        return _error(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith(("/v1", "/metrics")):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "authentication_error", "invalid_api_key")
        return await call_next(request)

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

    async def _parse(request: Request, cls):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as err:
            raise ApiError(400, _validation_message(err)) from None

    def _submit(body, prompt, chat: bool, on_event):
        adapter = None if body.model == engine.name else body.model
        try:
            sampling = SamplingParams(max_tokens=body.limit(DEFAULT_MAX_TOKENS), temperature=float(body.temperature), top_p=float(body.top_p),
                                      top_k=body.top_k, seed=body.seed, stop=tuple(body.stop or ()))
            return engine.submit(prompt, adapter, sampling, on_event=on_event, chat=chat)
        except AdapterNotFoundError as err:
            raise ApiError(404, f"model {body.model!r} does not exist: {err}", code="model_not_found", param="model") from None
        except (DeltatuneError, pydantic.ValidationError) as err:
            raise ApiError(400, str(err)) from None

    async def _run(request: Request, cls, chat: bool):
        body = await _parse(request, cls)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        prompt = [m.model_dump() for m in body.messages] if chat else body.prompt
        req = _submit(body, prompt, chat, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(_stream(req, events, rid, body.model, chat), media_type="text/event-stream")
        while "finish_reason" not in (ev := await events.get()):
            pass
        if ev["error"] is not None:
            raise ApiError(500, f"generation failed: {ev['error']}", "server_error")
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
                        yield "data: " + json.dumps({"error": {"message": f"generation failed: {ev['error']}", "type": "server_error", "param": None, "code": None}}) + "\n\n"
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
