"""A local server speaking Anthropic's Messages API, streaming included.

Usage::

    async with serve_anthropic() as wire:
        wire.enqueue(ErrorReply(529), TextReply(["Hel", "lo"], output_tokens=2))
        client = anthropic.AsyncAnthropic(api_key="test", base_url=wire.base_url)
        ...
        assert wire.requests[-1].body["max_tokens"] == 64

Each ``POST /v1/messages`` takes the next scripted reply (or ``wire.default``
when none is queued) and answers it the way the API does: SSE events when the
request says ``"stream": true`` (``message_start``, ``content_block_start``,
``ping``, ``content_block_delta``..., ``content_block_stop``, ``message_delta``,
``message_stop``), a JSON message otherwise.

- :class:`TextReply`: a text answer; ``error=`` ends it with a mid-stream
  ``event: error`` after the chunks, ``truncate=True`` drops the connection's
  closing events, ``delay_s`` paces the deltas.
- :class:`ToolUseReply`: a forced tool's ``tool_use`` block whose input arrives as
  ``input_json_delta`` pieces.
- :class:`ErrorReply`: an HTTP error before any stream (429, 529, 400, ...), with
  the API's error body.

``POST /v1/messages/count_tokens`` answers ``wire.token_count`` or, when that is
``None``, one token per started four characters of system prompt and message
text. ``GET /v1/models/{id}`` describes any model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakewire import RecordedRequest, record, serve, sse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""The error ``type`` the API puts in the body for each status."""


@dataclass(frozen=True)
class TextReply:
    """A streamed text answer, one ``text_delta`` per chunk."""

    chunks: Sequence[str] = ("Hello", " from", " fake", " Claude.")
    stop_reason: str = "end_turn"
    input_tokens: int = 11
    output_tokens: int | None = None
    """Cumulative output tokens in ``message_delta``; default: one per chunk."""
    ping: bool = True
    """Send a ``ping`` event after ``content_block_start``, as the API does."""
    error: str | None = None
    """After the chunks, send ``event: error`` of this type (``overloaded_error``,
    ``rate_limit_error``, ``api_error``...) and end the stream."""
    truncate: bool = False
    """End the response after the chunks with no closing events."""
    delay_s: float = 0.0
    """Pause before each delta."""
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    """Prompt-cache writes and reads, in ``message_start``'s usage beside
    ``input_tokens``, as the API reports them."""
    extra_events: Sequence[tuple[str, str]] = ()
    """Raw ``(event name, data)`` pairs sent after ``content_block_start``
    (and the ping), before the text: other blocks, unknown event types."""


@dataclass(frozen=True)
class ToolUseReply:
    """A ``tool_use`` block (what a forced ``tool_choice`` produces)."""

    name: str
    partial_json: Sequence[str]
    """The ``input_json_delta`` pieces; their concatenation is the tool input."""
    input_tokens: int = 20
    output_tokens: int = 12
    stop_reason: str = "tool_use"


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP error response instead of a message."""

    status: int
    error_type: str | None = None
    """Default: the API's type for ``status`` (see ``ERROR_TYPES``)."""
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)


Reply = TextReply | ToolUseReply | ErrorReply


@dataclass
class AnthropicWire:
    """The running server's script and record; see the module docstring."""

    base_url: str = ""
    default: Reply = field(default_factory=TextReply)
    token_count: int | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    replies: deque[Reply] = field(default_factory=deque)

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next ``POST /v1/messages`` requests with ``replies``, in order."""
        self.replies.extend(replies)

    def reset(self) -> None:
        """Forget queued replies and recorded requests; restore the defaults."""
        self.replies.clear()
        self.requests.clear()
        self.default = TextReply()
        self.token_count = None

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The ``POST /v1/messages`` requests only."""
        return [r for r in self.requests if r.path == "/v1/messages"]

    def _next(self) -> Reply:
        return self.replies.popleft() if self.replies else self.default


@contextlib.asynccontextmanager
async def serve_anthropic() -> AsyncIterator[AnthropicWire]:
    """Start a fake Anthropic API; yields its :class:`AnthropicWire`."""
    wire = AnthropicWire()

    async def messages(request: Request) -> Response:
        received = await record(request)
        wire.requests.append(received)
        reply = wire._next()
        request_id = f"req_{secrets.token_hex(8)}"
        if isinstance(reply, ErrorReply):
            return _error(reply, request_id)
        model = str(received.body.get("model", "claude-test"))
        if received.body.get("stream"):
            return StreamingResponse(
                _events(reply, model),
                media_type="text/event-stream",
                headers={"request-id": request_id, "cache-control": "no-cache"},
            )
        return JSONResponse(_message(reply, model), headers={"request-id": request_id})

    async def count_tokens(request: Request) -> Response:
        received = await record(request)
        wire.requests.append(received)
        count = wire.token_count
        if count is None:
            count = _estimate(received.body)
        return JSONResponse({"input_tokens": count})

    async def model(request: Request) -> Response:
        wire.requests.append(await record(request))
        model_id = request.path_params["model_id"]
        return JSONResponse(
            {
                "type": "model",
                "id": model_id,
                "display_name": model_id,
                "created_at": "2025-01-01T00:00:00Z",
            }
        )

    app = Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        ]
    )
    async with serve(app) as port:
        wire.base_url = f"http://127.0.0.1:{port}"
        yield wire


def _error(reply: ErrorReply, request_id: str) -> Response:
    body = {
        "type": "error",
        "error": {
            "type": reply.error_type or ERROR_TYPES.get(reply.status, "api_error"),
            "message": reply.message,
        },
        "request_id": request_id,
    }
    return JSONResponse(
        body, status_code=reply.status, headers={"request-id": request_id, **reply.headers}
    )


def _start(model: str, input_tokens: int, cache_write: int = 0, cache_read: int = 0) -> bytes:
    message: dict[str, Any] = {
        "id": f"msg_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "output_tokens": 1,
        },
    }
    return _event({"type": "message_start", "message": message})


def _event(data: dict[str, Any]) -> bytes:
    return sse(json.dumps(data), event=data["type"])


def _end(stop_reason: str, output_tokens: int) -> list[bytes]:
    return [
        _event({"type": "content_block_stop", "index": 0}),
        _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
        ),
        _event({"type": "message_stop"}),
    ]


async def _events(reply: TextReply | ToolUseReply, model: str) -> AsyncIterator[bytes]:
    if isinstance(reply, TextReply):
        yield _start(
            model,
            reply.input_tokens,
            reply.cache_creation_input_tokens,
            reply.cache_read_input_tokens,
        )
    else:
        yield _start(model, reply.input_tokens)
    if isinstance(reply, ToolUseReply):
        block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(8)}", "name": reply.name}
        yield _event(
            {"type": "content_block_start", "index": 0, "content_block": {**block, "input": {}}}
        )
        for piece in reply.partial_json:
            delta = {"type": "input_json_delta", "partial_json": piece}
            yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
        for event in _end(reply.stop_reason, reply.output_tokens):
            yield event
        return

    text_block = {"type": "text", "text": ""}
    yield _event({"type": "content_block_start", "index": 0, "content_block": text_block})
    if reply.ping:
        yield sse(json.dumps({"type": "ping"}), event="ping")
    for name, data in reply.extra_events:
        yield sse(data, event=name)
    for chunk in reply.chunks:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        delta = {"type": "text_delta", "text": chunk}
        yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
    if reply.error is not None:
        error = {"type": "error", "error": {"type": reply.error, "message": "scripted failure"}}
        yield sse(json.dumps(error), event="error")
        return
    if reply.truncate:
        return
    output_tokens = len(reply.chunks) if reply.output_tokens is None else reply.output_tokens
    for event in _end(reply.stop_reason, output_tokens):
        yield event


def _message(reply: TextReply | ToolUseReply, model: str) -> dict[str, Any]:
    """The non-streamed form of ``reply``."""
    if isinstance(reply, ToolUseReply):
        content: list[dict[str, Any]] = [
            {
                "type": "tool_use",
                "id": f"toolu_{secrets.token_hex(8)}",
                "name": reply.name,
                "input": json.loads("".join(reply.partial_json) or "{}"),
            }
        ]
        output_tokens = reply.output_tokens
    else:
        content = [{"type": "text", "text": "".join(reply.chunks)}]
        output_tokens = len(reply.chunks) if reply.output_tokens is None else reply.output_tokens
    return {
        "id": f"msg_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": model,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": output_tokens},
    }


def _estimate(body: dict[str, Any]) -> int:
    """One token per started four characters of system prompt and message text."""

    def text(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return "".join(text(part.get("text", "")) for part in value if isinstance(part, dict))
        return ""

    chars = [text(body.get("system", ""))]
    chars += [text(message.get("content", "")) for message in body.get("messages", [])]
    return sum(-(-len(part) // 4) for part in chars)
