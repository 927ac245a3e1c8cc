"""Local HTTP servers that speak the LLM providers' real wire formats.

The real SDKs are pointed at them through ``base_url``, so a test exercises the
SDK's parsing and our error mapping exactly as production does; nothing in
chathub or in the HTTP client is patched.

- :mod:`tests.fakewire.anthropic_server`: the Messages API (SSE events).
- :mod:`tests.fakewire.openai_server`: chat completions (``data:`` chunks).

Each module has an async context manager that starts a uvicorn server on a free
127.0.0.1 port in the running event loop and yields a *wire* object: its
``base_url``, a queue of scripted replies (``enqueue``; when empty, ``default``
answers), and ``requests``, the parsed requests received, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp


@dataclass
class RecordedRequest:
    """One request as the fake server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


async def record(request: Request) -> RecordedRequest:
    """The request with its JSON body (``{}`` when there is none)."""
    raw = await request.body()
    body = await request.json() if raw else {}
    return RecordedRequest(request.method, request.url.path, dict(request.headers), body)


def sse(data: str, event: str | None = None) -> bytes:
    """One server-sent event: optional ``event:`` line, ``data:`` line, blank line."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {data}\n\n".encode()


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[int]:
    """Run ``app`` on 127.0.0.1 on a free port in this event loop; yields the port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    # Leave SIGINT/SIGTERM to pytest: uvicorn would otherwise take them over while serving.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
            raise RuntimeError("fake wire server stopped during startup")
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task
