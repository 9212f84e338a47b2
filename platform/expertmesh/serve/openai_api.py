"""The OpenAI-compatible surface: request models (validated before any model work), the chat
template, response/chunk builders and OpenAI-shaped errors.

Supported: ``/v1/completions`` (one prompt: text or token ids) and ``/v1/chat/completions``,
``stream`` (SSE, ``data: {...}`` lines ending with ``data: [DONE]``), ``stream_options.
include_usage``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``, ``user``; vLLM-style extensions ``top_k``, ``ignore_eos``,
``stop_token_ids``. Fields OpenAI defines but this engine cannot honour (``n > 1``,
penalties, ``logprobs``, ``echo``, ``logit_bias``, ``best_of > 1``, ``suffix``) are accepted
only at their neutral values; anything else is a 400 naming the field.

Chat template (what :func:`render_chat` produces; the model sees plain text)::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

i.e. every message as ``<|role|>\\n{content}\\n``, then ``<|assistant|>\\n`` for the reply;
generation also stops at the next ``<|`` so a model that learned the format ends its turn.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

CHAT_TURN_STOP = "<|"
DEFAULT_CHAT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
# OpenAI fields this engine cannot honour: accepted only at these (neutral) values
NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
    "best_of": (1,), "suffix": ("",), "echo": (False,), "logprobs": (False, 0),
}


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized(message: str = "Incorrect API key provided.") -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return not_found(f"The model '{model}' does not exist or you do not have access to it.", "model",
                     "model_not_found")


def rate_limited(message: str, retry_after_s: float, code: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, code,
                    {"Retry-After": str(max(1, round(retry_after_s + 0.5)))})


def overloaded(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "overloaded", {"Retry-After": "1"})


def format_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message and the first offending parameter from pydantic/FastAPI errors."""
    parts, param = [], None
    for err in errors:
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "missing":
            parts.append("the request body is missing: send a JSON object")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        # drop union-branch tags (e.g. "str", "list[int]") pydantic puts in the location
        loc = [p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "int", "function-after")]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    unique = list(dict.fromkeys(parts))
    return "Invalid request: " + "; ".join(unique[:5]), param


# ---- requests ----------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    n: int | None = Field(default=None, description="only 1 is supported")
    presence_penalty: float | None = Field(default=None, description="not supported: 0 only")
    frequency_penalty: float | None = Field(default=None, description="not supported: 0 only")
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported: empty only")
    # vLLM-style extensions
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=64)

    @field_validator(*NEUTRAL_ONLY, check_fields=False)
    @classmethod
    def _neutral_only(cls, v: Any, info: ValidationInfo) -> Any:
        allowed = NEUTRAL_ONLY[info.field_name]
        if v is not None and v not in allowed:
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server "
                             f"(allowed: {' or '.join(repr(a) for a in allowed)})")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def sampling(self, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> dict[str, Any]:
        """Keyword arguments for :class:`expertmesh.engine.SamplingParams`."""
        params: dict[str, Any] = {"max_tokens": max_tokens, "stop": tuple(self.stop or ()) + extra_stop,
                                  "ignore_eos": self.ignore_eos}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.top_k is not None:
            params["top_k"] = self.top_k
        if self.seed is not None:
            params["seed"] = self.seed
        if self.stop_token_ids:
            params["stop_token_ids"] = tuple(self.stop_token_ids)
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    echo: bool | None = Field(default=None, description="not supported: false only")
    logprobs: int | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, description="only 1 is supported")
    suffix: str | None = Field(default=None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got a batch of {len(v)}")
            v = v[0]
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt is empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = Field(default=None, description="not supported: false only")

    @property
    def requested_max_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS


for _model in (_Request, CompletionRequest, ChatMessage, ChatCompletionRequest):
    _model.model_rebuild()


def render_chat(messages: list[ChatMessage]) -> str:
    """The chat template (see the module docstring)."""
    turns = "".join(f"<|{'system' if m.role == 'developer' else m.role}|>\n{m.text()}\n" for m in messages)
    return turns + "<|assistant|>\n"


# ---- responses -----------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, token_ids: list[int], finish: str | None,
                    prompt_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}],
            "usage": usage(prompt_tokens, len(token_ids))}


def completion_chunk(rid: str, model: str, text: str, token_ids: list[int], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}]}


def chat_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
