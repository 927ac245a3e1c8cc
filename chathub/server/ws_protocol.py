"""uvicorn's WebSocket protocol, leaner per idle socket.

An idle hub socket costs mostly what the ASGI server keeps for it. This
subclass of uvicorn's ``websockets-sansio`` protocol keeps the same
behaviour and holds less:

* the ASGI receive queue is a list and at most one future, not an
  ``asyncio.Queue`` (three deques and an ``asyncio.Event``, about 3 KiB);
* the "transport writable" flag is a slotted flag whose future exists only
  while a send waits for a paused transport, not an ``asyncio.Event``;
* the handshake's request and response, and their headers, are let go once
  the handshake is done: the scope keeps its own copy of the request headers
  and nothing reads either object afterwards.

It also offers the application a way to send without a task switch per
frame, as the ASGI extension :data:`SEND_NOW` in the connection's scope:
``scope["extensions"][SEND_NOW]["send_texts"](texts)`` writes the texts as
text frames in one transport write, at once, and returns True; or writes
nothing and returns False when the socket is not open or its transport is
paused (the peer is not reading), and the caller takes the ordinary
awaitable ``websocket.send`` path, which waits for the transport. A hub
fanning one event out to many sockets then costs one synchronous write per
socket instead of a task wake-up and a coroutine chain per frame, and a
socket with a backlog sends it in one write.

The HTTP protocol chathub serves with is uvicorn's httptools one, with one
change: when the server stops while a response is still streaming (a reply
as server-sent events, or a REST caller waiting for its finished reply), it
starts the same closing hook as the sockets do, so that the live replies end
(``reply.failed``, ``interrupted``) and their responses complete at once,
instead of running on into uvicorn's graceful-shutdown timeout and being cut
there with no ending.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from chathub.config import Settings

log = logging.getLogger("chathub.ws")

SEND_NOW = "chathub.websocket.send_now"
"""The scope extension of :class:`LeanWebSocketProtocol`'s synchronous send."""


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked, uncompressed WebSocket text frame (RFC 6455
    5.2), as a server sends it: the same bytes for every socket."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


class _WireCache:
    """The last text framed and its frame: a hub sends one event's text to
    every joined socket in a row, so it is framed once, not once per socket.
    (Kept by identity, not equality: no hashing or comparing of the text.)"""

    __slots__ = ("frame", "text")

    def __init__(self) -> None:
        self.text: str | None = None
        self.frame = b""

    def of(self, text: str) -> bytes:
        if text is not self.text:
            self.frame = text_frame(text)
            self.text = text
        return self.frame


_WIRE = _WireCache()


class _Waiters:
    """Futures of the tasks waiting on an object, created only while some
    task waits (an idle socket's objects hold none)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def _park(self) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        return waiter

    def _unpark(self, waiter: asyncio.Future[None]) -> bool:
        """Forget ``waiter``; False if it was already woken (and removed)."""
        if self._waiters is None or waiter not in self._waiters:
            return False
        self._waiters.remove(waiter)
        if not self._waiters:
            self._waiters = None
        return True


class Inbox(_Waiters):
    """What uvicorn's protocol needs of its receive queue: ``put_nowait``,
    ``get`` and ``empty``, for the socket's one reader (a second concurrent
    reader is served too, in order)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        super().__init__()
        self._items: list[Any] = []

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break
        if not waiters:
            self._waiters = None

    async def get(self) -> Any:
        while not self._items:
            waiter = self._park()
            try:
                await waiter
            except BaseException:
                if not self._unpark(waiter) and self._items:
                    self._wake()  # woken, then cancelled: pass the wake-up on
                raise
        item = self._items.pop(0)
        if self._items:
            self._wake()  # another reader may be waiting for what is left
        return item


class Flag(_Waiters):
    """``asyncio.Event``'s ``set``/``clear``/``is_set``/``wait``, slotted; its
    waiters' futures exist only while the flag is clear and someone waits."""

    __slots__ = ("_value",)

    def __init__(self, value: bool = True) -> None:
        super().__init__()
        self._value = value

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = self._park()
        try:
            await waiter
        finally:
            self._unpark(waiter)
        return True


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sansio protocol, minus what an idle socket need not hold."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The scope holds its own copy of the headers; the parser's
        # generator frame keeps ``event`` alive for the socket's life.
        event.headers.clear()
        self.request = None  # type: ignore[assignment]
        if self.handshake_complete:  # rejected by websockets: sent and done
            self._forget_response()
        else:
            self.scope["extensions"][SEND_NOW] = {"send_texts": self.send_texts_now}

    def send_texts_now(self, texts: Iterable[str]) -> bool:
        """Write ``texts`` as text frames in one transport write if the
        socket is open and the transport takes data; else write nothing
        and return False."""
        if (
            not self.writable.is_set()
            or self.close_sent
            or self.disconnected
            or not self.handshake_complete
            or self.initial_response is not None
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        conn = self.conn
        if conn.extensions or conn.expect_continuation_frame:
            # Compressed (per socket, with its own context): websockets frames it.
            for text in texts:
                conn.send_text(text.encode())
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(b"".join(map(_WIRE.of, texts)))
        return True

    def shutdown(self) -> None:
        """The server is stopping: uvicorn closes each socket with 1012 at
        once, then shuts the app down. First let the app end its live
        replies, so that their endings reach the sockets (once per server,
        for every socket; bounded by :data:`CLOSING_HOOK_TIMEOUT_S`)."""
        closing = _closing(self)
        if closing is None or closing.done():
            super().shutdown()
        else:
            closing.add_done_callback(self._shutdown_after_closing)

    def _shutdown_after_closing(self, _closing: asyncio.Future[None]) -> None:
        if not self.transport.is_closing():
            super().shutdown()

    def start_keepalive(self) -> None:
        # uvicorn calls this right after writing the 101 response: the
        # handshake is over, nothing reads the response any more.
        self._forget_response()
        super().start_keepalive()

    def _forget_response(self) -> None:
        response = getattr(self, "response", None)
        if response is not None:
            response.headers.clear()
            self.response = None  # type: ignore[assignment]


HEAD_TIMEOUT_S = 30.0
"""How long a request's head (request line and headers) may take to arrive,
from the connection (or the end of the previous response) on: uvicorn has
no such limit, and a client sending a header line now and then would hold
its connection for ever."""


class ClosingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which also ends the app's live replies
    when the server stops while this connection's response still streams,
    and closes a connection whose request head takes longer than
    :data:`HEAD_TIMEOUT_S`."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # no request under way: nothing to answer

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            _closing(self)
        super().shutdown()


CLOSING_HOOK_TIMEOUT_S = 5.0


def _closing(protocol: Any) -> asyncio.Future[None] | None:
    """The app's closing hook (``closing_hook`` on the app under uvicorn's
    wrappers), started once per server; None when the app has none."""
    state = protocol.config  # one per server
    closing: asyncio.Future[None] | None = getattr(state, "chathub_closing", None)
    if closing is None:
        app = protocol.app
        while app is not None and getattr(app, "closing_hook", None) is None:
            app = getattr(app, "app", None)  # uvicorn's middleware wraps it
        if app is None:
            return None
        closing = asyncio.ensure_future(_bounded(app.closing_hook()))
        state.chathub_closing = closing
    return closing


async def _bounded(hook: Awaitable[None]) -> None:
    try:
        async with asyncio.timeout(CLOSING_HOOK_TIMEOUT_S):
            await hook
    except Exception:
        log.exception("the app's closing hook failed")


# A module-level class, so that ``chathub serve --workers`` can hand it to
# its worker processes (by reference, pickled).
LEAN_PROTOCOL: type[asyncio.Protocol] = LeanWebSocketProtocol
HTTP_PROTOCOL: type[asyncio.Protocol] = ClosingHttpProtocol


def ws_protocol_class() -> type[asyncio.Protocol]:
    """The WebSocket protocol chathub serves with: the lean subclass of
    uvicorn's sansio implementation."""
    return LEAN_PROTOCOL


def uvicorn_settings(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments ``chathub serve`` and the test
    servers share: HTTP and WebSocket protocols, frame size limit,
    compression, the proxies whose forwarded headers count."""
    return {
        "http": HTTP_PROTOCOL,
        "ws": ws_protocol_class(),
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }
