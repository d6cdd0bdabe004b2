"""OpenAI-compatible request bodies, validated strictly (wrong types are errors, not coerced).

Unknown fields are ignored, as clients send optional extras (``user``, ``logprobs: null`` …);
fields we cannot honour with a non-default value (``n > 1``) are refused with the reason.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
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
    messages: list[ChatMessage] = Field(min_length=1)
