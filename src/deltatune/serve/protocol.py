"""OpenAI-compatible request bodies, validated strictly (wrong types are errors, not coerced).

Unknown fields are ignored, as clients send optional extras (``user``, ``logprobs: null`` …);
fields we cannot honour with a non-default value (``n > 1``) are refused with the reason. Every
size a client controls is bounded here (messages, stop strings, names, the seed's range); the
body's byte size and the prompt's token count are bounded by the server and the engine.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_MESSAGES = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_NAME_CHARS = 256
MAX_SEED = 2**64 - 1  # what a torch generator takes


def _no_control_characters(value: str, what: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError(f"{what} must not contain control characters (found {next(c for c in value if ord(c) < 32 or c == chr(127))!r})")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(min_length=1, max_length=MAX_NAME_CHARS)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)

    @field_validator("model")
    @classmethod
    def _model_name(cls, v):
        return _no_control_characters(v, "model")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Body):
    prompt: StrictStr | list[StrictStr]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a string or a list of one string)")
            return v[0]
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
