"""One client socket: a bounded send queue drained by one writer task.

Nobody awaits a client: producers call :meth:`Connection.send`, which only
appends to the queue. A client that stops reading fills its queue and is
closed with :data:`CLOSE_SLOW`; the others never notice.

Most sockets of a hub are idle, so an idle one holds as little as it can: the
writer task exists only while there are frames to send (it is started by the
first frame queued and ends once the queue is empty), and there are no
``asyncio.Event`` objects (each holds a deque of waiters, about 400 bytes).

Served by chathub's own uvicorn protocol (:mod:`chathub.server.ws_protocol`),
a frame usually needs no queue and no writer at all: it is held until the
end of the event loop's current turn, and then every socket written to in
that turn gets its frames in one write, if its transport takes data. Held
that briefly, the frames of a turn leave together: the writes of one turn
follow each other (a peer woken by the first finds the others already
there), and several frames for one socket cost one write. Only a socket whose
transport is paused (its peer reads slower than we write) builds up a queue,
which its writer sends in one write once the transport takes data again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from chathub.auth import Principal
from chathub.server import metrics
from chathub.server.ws_protocol import SEND_NOW

if TYPE_CHECKING:
    from chathub.server.session_log import Event

log = logging.getLogger("chathub.ws")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012  # as uvicorn closes sockets on shutdown: reconnect anywhere
CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW = 4408

CLOSE_GRACE_S = 10.0
"""How long a close frame may wait behind data the peer has not read yet.
Past it the server gives up on a clean close and drops the connection."""


WRITER_LINGER_S = 1.0
"""How long a socket's writer task waits for the next frame before it ends."""


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


CatchUp = Callable[["Connection", str], None]
SendNow = Callable[[Iterable[str]], bool]


def _send_now_of(websocket: WebSocket | None) -> SendNow | None:
    """The socket's synchronous send, if its ASGI server offers one."""
    if websocket is None:
        return None
    extension = (websocket.scope.get("extensions") or {}).get(SEND_NOW)
    return extension.get("send_texts") if extension else None


_holding: dict[asyncio.AbstractEventLoop, list[Connection]] = {}
"""Per event loop, the connections holding frames for the end of its turn."""


def _hold(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    held = _holding.get(loop)
    if held is None:
        held = _holding[loop] = []
        # Runs after every callback already due in this turn; in an empty
        # context, not that of whichever task held the first frame (its log
        # records would carry that task's ids).
        loop.call_soon(_write_all_held, loop, context=contextvars.Context())
    held.append(conn)


def _write_all_held(loop: asyncio.AbstractEventLoop) -> None:
    for conn in _holding.pop(loop, ()):
        try:
            conn._write_held()
        except Exception:  # one socket's failure is not the others'
            log.exception("writing to %s failed", conn.id)


@dataclass(slots=True)
class SessionCursor:
    """Where this socket is in one session's event stream."""

    last_seq: int
    catching_up: bool = False


class Connection:
    """A subscriber to sessions and dashboards. With a ``websocket`` a writer
    task sends its frames; without one (server-sent events) the owner reads
    them with :meth:`take`."""

    __slots__ = (
        "_held",
        "_queue",
        "_send_now",
        "_stopped",
        "_waiter",
        "_writer",
        "checked_at",
        "close_code",
        "closed",
        "dashboard",
        "dashboard_held",
        "expiry",
        "finished",
        "id",
        "max_queue",
        "principal",
        "reader",
        "sessions",
        "websocket",
    )

    def __init__(
        self,
        websocket: WebSocket | None,
        connection_id: str,
        principal: Principal,
        max_queue: int,
    ) -> None:
        self.websocket = websocket
        self.id = connection_id
        self.principal = principal
        self.checked_at = 0.0
        """When (monotonic) the credentials were last checked; see
        :mod:`chathub.server.credentials`."""
        self.expiry: asyncio.TimerHandle | None = None
        """The timer that closes the socket when its token expires."""
        self.max_queue = max_queue
        self.sessions: dict[str, SessionCursor] = {}
        self.dashboard = False
        self.dashboard_held: list[tuple[int, str]] | None = None
        self.closed = False
        self.close_code: int | None = None
        self.reader: asyncio.Task[Any] | None = None
        """The task reading the socket's frames; cancelled once a close is over."""
        self.finished = False
        """True once a close started by :meth:`close_soon` is done or given up."""
        # Frames not sent yet; None when there are none (a deque is about
        # 600 bytes even when empty, and idle sockets are most of a hub).
        self._queue: deque[str] | None = None
        # The one task sending this socket's frames, while it has any.
        self._writer: asyncio.Task[None] | None = None
        # Set by drain_and_stop: no writer starts again.
        self._stopped = False
        # What take() (socket-less use) or a lingering writer waits on.
        self._waiter: asyncio.Future[None] | None = None
        self._send_now = _send_now_of(websocket)
        # Frames held for the end of this loop turn (see _hold); None if none.
        self._held: list[str] | None = None

    def send(self, frame: str) -> None:
        """Queue a frame; never blocks. Overflow closes the socket as slow."""
        if self.closed:
            return
        held = self._held
        if held is not None:
            held.append(frame)
            return
        queue = self._queue
        if (
            not queue
            and self._send_now is not None
            and not self._stopped
            # No writer, or one lingering for the next frame: none is in
            # the middle of a send this frame could overtake.
            and (self._writer is None or self._waiter is not None)
        ):
            self._held = [frame]
            _hold(self)
            return
        self._enqueue(frame)

    def _write_held(self) -> None:
        """The end of the loop turn: write the held frames at once, or queue
        them for the writer if the transport no longer takes data."""
        held, self._held = self._held, None
        if not held or self.closed:
            return
        if self._send_now is not None and self._send_now(held):
            metrics.FRAMES_OUT.inc(len(held))
            return
        for frame in held:
            self._enqueue(frame)

    def _enqueue(self, frame: str) -> None:
        if self.closed:
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= self.max_queue:
            metrics.SLOW_CLOSES.inc()
            log.warning("closing slow client %s (queue full)", self.id)
            self.close_soon(CLOSE_SLOW, "slow consumer: send queue full")
            return
        queue.append(frame)
        if self._writer is None and self.websocket is not None and not self._stopped:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        else:
            # A running writer sends this frame too (wake it if it lingers);
            # socket-less, take() is waiting.
            self._wake()

    async def take(self) -> list[str]:
        """Wait for queued frames and return them all (socket-less use); an
        empty list once the connection is closed."""
        while not self._queue and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frames = list(self._queue or ())
        self._queue = None
        return frames

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def queue_depth(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def deliver(self, event: Event, catch_up: CatchUp) -> None:
        """Queue a live session event in ``seq`` order with no gap and no
        duplicate; a gap makes the socket read what it missed from the log."""
        cursor = self.sessions.get(event.session_id)
        if cursor is None or cursor.catching_up or event.seq <= cursor.last_seq:
            return
        if event.seq == cursor.last_seq + 1:
            cursor.last_seq = event.seq
            self.send(event.frame)
            return
        catch_up(self, event.session_id)

    async def _write_loop(self) -> None:
        """Send until the queue is empty, then linger up to
        :data:`WRITER_LINGER_S` for the next frame and end if none comes: an
        idle socket keeps no writer task, while a socket in a stream reuses
        its writer (waking a task costs much less than starting one per
        frame). :meth:`send` starts a writer only when there is none, so
        there is never more than one."""
        ws = self.websocket
        assert ws is not None
        send_now = self._send_now
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            while not self.closed:
                queue = self._queue
                while queue:
                    if send_now is not None and send_now(queue):
                        sent += len(queue)  # the whole backlog in one write
                        queue.clear()
                        break
                    await ws.send_text(queue.popleft())
                    sent += 1
                if sent:
                    metrics.FRAMES_OUT.inc(sent)
                    sent = 0
                if self._stopped:
                    break
                waiter = self._waiter = loop.create_future()
                timer = loop.call_later(WRITER_LINGER_S, _settle, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
                if not self._queue:
                    break
        except Exception:
            # The peer went away; the reader side notices and cleans up.
            self.closed = True
        finally:
            if sent:
                metrics.FRAMES_OUT.inc(sent)
        # No await since the queue was seen empty: nothing was queued after.
        self._writer = None
        if not self._queue:
            self._queue = None

    def close_soon(self, code: int, reason: str = "") -> None:
        """Stop sending and close the socket in the background (after the
        frames already sent)."""
        if self.closed:
            return
        self._write_held()
        self.closed = True
        self.close_code = code
        self._queue = None
        self._wake()
        asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self._stop_writer()
            if (
                self.websocket is not None
                and self.websocket.application_state == WebSocketState.CONNECTED
            ):
                # The close frame queues behind what the peer has not read: a
                # slow reader gets it once it reads again, if it does in time.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_GRACE_S):
                        await self.websocket.close(code, reason)
        finally:
            self.finished = True
            # The reader may wait for a frame that never comes: stop it.
            if self.reader is not None and not self.reader.done():
                self.reader.cancel()

    async def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def drain_and_stop(self, timeout: float = 2.0) -> None:
        """Flush what is queued (best effort), then stop the writer for good."""
        self._stopped = True
        self._wake()  # a lingering writer ends now
        writer = self._writer
        if writer is not None and not self.closed and timeout > 0:
            # The writer ends by itself once the queue is empty.
            await asyncio.wait((writer,), timeout=timeout)
        await self._stop_writer()
