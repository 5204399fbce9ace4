"""The OpenAI wire format the service speaks: request bodies (validated) and response chunks.

Requests are pydantic models, so FastAPI validates every field and publishes the schema in
``/openapi.json`` (which schemathesis then attacks). Numbers are strict: ``"temperature": "0.5"`` is
refused, not coerced, because a client that sends strings has a bug worth seeing.

Responses follow what the ``openai`` SDK parses and what ``vllm serve`` sends:

* non-streaming: one JSON object (``chat.completion`` / ``text_completion``) with ``usage``;
* streaming: server-sent events, each ``data: <json>\\n\\n``; for chat, a first chunk carrying only
  ``{"role": "assistant"}``, then one chunk per piece of text, a last chunk with ``finish_reason``, an
  optional usage chunk (``choices: []``) when ``stream_options.include_usage`` is set, and the line
  ``data: [DONE]``. An error after the stream started is sent as ``data: {"error": {...}}``, which the
  SDK raises as an ``APIError``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr

# Bounds of the OpenAI API (temperature 0..2, top_p (0, 1], penalties -2..2, at most 4 stop sequences).
# A strict float takes JSON integers too (2 -> 2.0) but no strings or booleans; the bounds sit on the
# float itself, not on a union, so that /openapi.json publishes them as minimum/maximum.
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopP = Annotated[StrictFloat, Field(gt=0, le=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]


def _integral(value):
    """JSON has one kind of number: 68.0 is the integer 68 for JSON Schema (which /openapi.json speaks)
    and for vLLM's server; 68.5, "68" and true are still refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(**bounds):
    """A strict integer field (bounds as in ``Field``), published as ``integer`` with minimum/maximum."""
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_integral)]


def _unicode(value):
    """JSON may escape half of a UTF-16 surrogate pair alone ("\\ud800"); Python then holds a string that is
    not Unicode text, which the tokenizer refuses with a TypeError (a 500). Refuse it here, as a 422. It runs
    before pydantic's own string checks (a length constraint would otherwise answer first, with a message
    that does not say what is wrong); anything but a string passes on to them."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate ({value[exc.start]!a} at position {exc.start}), which "
                         "is not Unicode text: send the character as a complete surrogate pair, or remove it") from None
    return value


Text = Annotated[StrictStr, BeforeValidator(_unicode)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), BeforeValidator(_unicode)]
PositiveInt = _int(ge=1)
TokenId = _int()
# vLLM refuses an empty stop string (it would match everywhere).
StopString = NonEmptyText
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
# The engine's transport (MessagePack) carries 64-bit integers only (vLLM's server takes that range), but
# a JSON reader with doubles (JavaScript, JSON Schema validators) cannot tell 2**63 - 1 from 2**63:
# the published bound is the largest integer every JSON reader holds exactly.
JSON_SAFE_INT = 2**53 - 1
Seed = _int(ge=-JSON_SAFE_INT, le=JSON_SAFE_INT)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    # Unknown fields are ignored, as the OpenAI API does (clients send fields a server may not know).
    model_config = ConfigDict(extra="ignore")
    model: Text
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: _int(ge=1, le=1, description="only n=1 is served") = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # vLLM's extension (the openai SDK sends it through extra_body): do not stop at end-of-sequence.
    ignore_eos: StrictBool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: NonEmptyText | Annotated[list[TokenId], Field(min_length=1)]
    max_tokens: PositiveInt = 16  # the OpenAI default for completions

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (documented in /openapi.json; ``error_body`` builds it)."""

    error: ErrorInfo


class ProbeStatus(BaseModel):
    """What ``/health`` and ``/ready`` answer: ``ok``, ``ready``, ``starting``, ``dead`` or ``draining``."""

    status: str


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> dict:
    """The OpenAI error object, as the SDK expects it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


@dataclass
class Delta:
    """What one engine step added to a request: new text, how many tokens, and whether it ended."""

    text: str
    tokens: int
    finish_reason: str | None = None


class ChunkWriter:
    """Turns a request's deltas into the chunks (and finally the one response) of the OpenAI API."""

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str, prompt_tokens: int,
                 include_usage: bool = False):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.include_usage = include_usage
        self.text: list[str] = []
        self.finish_reason: str | None = None

    def _chunk(self, choices: list, usage: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return body

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def opening(self) -> bytes:
        """The chat stream's first event (the role); nothing for completions."""
        if self.kind != "chat":
            return b""
        return sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]))

    def add(self, delta: Delta) -> bytes:
        """Record a delta; the event to stream for it (empty when it carries nothing to show)."""
        self.completion_tokens += delta.tokens
        self.text.append(delta.text)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if not delta.text and not delta.finish_reason:
            return b""
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {}, "logprobs": None,
                      "finish_reason": delta.finish_reason}
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}
        return sse(self._chunk([choice]))

    def closing(self) -> bytes:
        """The usage event (when asked for) and ``[DONE]``."""
        tail = sse(self._chunk([], self.usage())) if self.include_usage else b""
        return tail + DONE

    def response(self) -> dict:
        """The whole non-streaming response."""
        text = "".join(self.text)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}
