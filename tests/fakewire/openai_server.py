"""A local server speaking OpenAI's chat completions API, streaming included.

Usage::

    async with serve_openai() as wire:
        wire.enqueue(ErrorReply(429), ChatReply(["Hel", "lo"]))
        client = openai.AsyncOpenAI(api_key="test", base_url=wire.base_url)  # ends in /v1
        ...
        assert wire.requests[-1].body["stream_options"] == {"include_usage": True}

Each ``POST /v1/chat/completions`` takes the next scripted reply (or
``wire.default``) and answers it as the API does. Streamed (``"stream": true``):
a first chunk with the assistant role, one chunk per text piece, a chunk with
``finish_reason``, then, only if the request asked for
``stream_options.include_usage``, a usage chunk whose ``choices`` is ``[]`` (or
``null``, as vLLM sends, with ``usage_choices="null"``), then ``data: [DONE]``.
Not streamed: one ``chat.completion`` object with the joined text.

- :class:`ChatReply`: a text answer; ``error=`` puts an ``{"error": {...}}`` data
  object after the chunks and ends the stream there (what servers do mid-stream);
  ``raw_data`` sends ``data:`` lines as they are (garbled JSON, say);
  ``usage_every_chunk`` sends the usage so far with every chunk, as vLLM does
  with ``continuous_usage_stats``.
- :class:`ErrorReply`: an HTTP error before any stream (429, 500, 400, ...).

``GET /v1/models`` lists one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakewire import RecordedRequest, record, serve, sse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}


@dataclass(frozen=True)
class ChatReply:
    """A chat completion, streamed one chunk per text piece."""

    chunks: Sequence[str] = ("Hello", " from", " fake", " GPT.")
    finish_reason: str = "stop"
    prompt_tokens: int = 9
    completion_tokens: int | None = None
    """Default: one per chunk."""
    usage_choices: Literal["empty", "null"] = "empty"
    """How the usage chunk spells "no choices": ``[]`` (OpenAI) or ``null`` (vLLM)."""
    error: str | None = None
    """After the chunks, send ``{"error": {"type": error, ...}}`` and end the stream."""
    error_code: str | None = None
    delay_s: float = 0.0
    """Pause before each content chunk."""
    extra_choices: Sequence[dict[str, Any]] = ()
    """Choice objects sent one per chunk after the first (role) chunk: other
    choices' ``index``, deltas without ``content``."""
    raw_data: Sequence[str] = ()
    """``data:`` payloads sent as they are after the first (role) chunk and
    the extra choices, before the text: ``{not json``, say."""
    usage_every_chunk: bool = False
    """Put the usage so far (``prompt_tokens`` and the content chunks sent)
    in every chunk, when the request asks for usage at all."""


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP error response instead of a completion."""

    status: int
    error_type: str | None = None
    code: str | None = None
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)


Reply = ChatReply | ErrorReply


@dataclass
class OpenAIWire:
    """The running server's script and record; see the module docstring."""

    base_url: str = ""
    """Ends in ``/v1``, as the SDK's ``base_url`` expects."""
    default: Reply = field(default_factory=ChatReply)
    requests: list[RecordedRequest] = field(default_factory=list)
    replies: deque[Reply] = field(default_factory=deque)

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next ``POST /v1/chat/completions`` requests with ``replies``."""
        self.replies.extend(replies)

    def reset(self) -> None:
        """Forget queued replies and recorded requests; restore the default."""
        self.replies.clear()
        self.requests.clear()
        self.default = ChatReply()

    def _next(self) -> Reply:
        return self.replies.popleft() if self.replies else self.default


@contextlib.asynccontextmanager
async def serve_openai() -> AsyncIterator[OpenAIWire]:
    """Start a fake OpenAI-compatible API; yields its :class:`OpenAIWire`."""
    wire = OpenAIWire()

    async def completions(request: Request) -> Response:
        received = await record(request)
        wire.requests.append(received)
        reply = wire._next()
        request_id = f"req_{secrets.token_hex(8)}"
        if isinstance(reply, ErrorReply):
            error = {
                "message": reply.message,
                "type": reply.error_type or ERROR_TYPES.get(reply.status, "server_error"),
                "param": None,
                "code": reply.code,
            }
            return JSONResponse(
                {"error": error},
                status_code=reply.status,
                headers={"x-request-id": request_id, **reply.headers},
            )
        model = str(received.body.get("model", "gpt-test"))
        if received.body.get("stream"):
            options = received.body.get("stream_options") or {}
            return StreamingResponse(
                _chunks(reply, model, include_usage=bool(options.get("include_usage"))),
                media_type="text/event-stream",
                headers={"x-request-id": request_id},
            )
        return JSONResponse(_completion(reply, model), headers={"x-request-id": request_id})

    async def models(request: Request) -> Response:
        wire.requests.append(await record(request))
        model = {"id": "gpt-test", "object": "model", "created": 0, "owned_by": "fakewire"}
        return JSONResponse({"object": "list", "data": [model]})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    async with serve(app) as port:
        wire.base_url = f"http://127.0.0.1:{port}/v1"
        yield wire


def _usage(reply: ChatReply) -> dict[str, int]:
    completion = len(reply.chunks) if reply.completion_tokens is None else reply.completion_tokens
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": reply.prompt_tokens + completion,
    }


async def _chunks(reply: ChatReply, model: str, *, include_usage: bool) -> AsyncIterator[bytes]:
    base = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fakewire",
    }

    sent = 0  # content chunks so far: the usage of `usage_every_chunk`

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return choices_chunk(choice)

    def choices_chunk(choice: dict[str, Any]) -> bytes:
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        if include_usage and reply.usage_every_chunk:
            extra["usage"] = {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": sent,
                "total_tokens": reply.prompt_tokens + sent,
            }
        return sse(json.dumps({**base, "choices": [choice], **extra}))

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for choice in reply.extra_choices:
        yield choices_chunk(choice)
    for data in reply.raw_data:
        yield sse(data)
    for piece in reply.chunks:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        sent += 1
        yield chunk({"content": piece})
    if reply.error is not None:
        error = {
            "message": "scripted failure",
            "type": reply.error,
            "param": None,
            "code": reply.error_code,
        }
        yield sse(json.dumps({"error": error}))
        return
    yield chunk({}, reply.finish_reason)
    if include_usage:
        choices: list[Any] | None = [] if reply.usage_choices == "empty" else None
        yield sse(json.dumps({**base, "choices": choices, "usage": _usage(reply)}))
    yield sse("[DONE]")


def _completion(reply: ChatReply, model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(reply.chunks), "refusal": None}
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": _usage(reply),
    }
