"""Request body limits, enforced while the body streams in (a pure ASGI
middleware, so an oversize upload is refused without being buffered): its
size, and how long it may pause between two pieces."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chathub.errors import BodyTimeout, ChathubError, TooLarge

MULTIPART_OVERHEAD = 64 * 1024
DISCARD_BYTES = 1024 * 1024
"""How much of a body declared past its limit is still read (and dropped)."""
BODY_IDLE_TIMEOUT_S = 30.0
"""How long the next piece of a request body may take to come, as nginx's
``client_body_timeout``: an upload that stalls longer is answered 408 (it
would hold its task, and its part of a file, for as long as the client
likes). The whole body has no deadline: a large upload on a slow line goes
on as long as it keeps moving."""


class BodyStalled(HTTPException):
    """Raised from ``receive`` when the body paused past
    :data:`BODY_IDLE_TIMEOUT_S` (an HTTPException, as :class:`BodyTooLarge`)."""

    def __init__(self) -> None:
        super().__init__(408, stalled_message())


def stalled_message() -> str:
    return f"the request body stalled for more than {BODY_IDLE_TIMEOUT_S:g} s"


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException so that FastAPI's body
    parsing re-raises it untouched and the problem handler renders a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    """Answers 413 ``too_large`` when a body exceeds the limit for its path,
    408 when it stalls (see :data:`BODY_IDLE_TIMEOUT_S`)."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await refuse(send, receive, too_large(limit), drain=DISCARD_BYTES)
                    return
        received = 0
        body_done = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # now only a disconnect can come, whenever it does
                return await receive()
            try:
                async with asyncio.timeout(BODY_IDLE_TIMEOUT_S):
                    message = await receive()
            except TimeoutError:
                raise BodyStalled() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await refuse(send, receive, too_large(limit), drain=0)
        except BodyStalled:
            if not response_started:
                await refuse(send, receive, BodyTimeout(stalled_message()), drain=0)


DISCARD_WITHIN_S = 30.0
"""How long the rest of a refused body is read at most."""


async def refuse(
    send: Send, receive: Receive, error: ChathubError, *, drain: float = math.inf
) -> None:
    """Answer ``error`` (problem+json) and close the connection, as nginx's
    lingering close does: the answer goes out at once, then up to ``drain``
    more bytes of the body are read and dropped (for at most
    :data:`DISCARD_WITHIN_S`; inside :class:`BodyLimit`, its limit bounds
    them too) before the response ends and uvicorn closes. A client, or a
    proxy, still sending the body reads the answer instead of a reset: a
    proxy counts a reset as its upstream failing."""
    body = orjson.dumps(error.problem())
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in error.http_headers().items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    with contextlib.suppress(TimeoutError, BodyTooLarge):
        async with asyncio.timeout(DISCARD_WITHIN_S):
            while drain > 0:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drain -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
    await send({"type": "http.response.body", "body": b""})


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body is larger than {limit} bytes")
