"""One client socket: a bounded send queue drained by one writer task.

Nobody awaits a client: producers call :meth:`Connection.send`, which only
appends to the queue. A client that stops reading fills its queue and is
closed with :data:`CLOSE_SLOW`; the others never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from chathub.auth import Principal
from chathub.server import metrics

if TYPE_CHECKING:
    from chathub.server.session_log import Event

log = logging.getLogger("chathub.ws")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW = 4408

CLOSE_GRACE_S = 10.0
"""How long a close frame may wait behind data the peer has not read yet.
Past it the server gives up on a clean close and drops the connection."""


CatchUp = Callable[["Connection", str], None]


@dataclass
class SessionCursor:
    """Where this socket is in one session's event stream."""

    last_seq: int
    catching_up: bool = False


class Connection:
    """A subscriber to sessions and dashboards. With a ``websocket`` a writer
    task sends its frames; without one (server-sent events) the owner reads
    them with :meth:`take`."""

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
        self.max_queue = max_queue
        self.sessions: dict[str, SessionCursor] = {}
        self.dashboard = False
        self.dashboard_held: list[tuple[int, str]] | None = None
        self.closed = False
        self.close_code: int | None = None
        self._queue: deque[str] = deque()
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None
        """The task reading the socket's frames; cancelled once a close is over."""
        self.finished = asyncio.Event()
        """Set once a close started by :meth:`close_soon` is done or given up."""

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")

    def send(self, frame: str) -> None:
        """Queue a frame; never blocks. Overflow closes the socket as slow."""
        if self.closed:
            return
        if len(self._queue) >= self.max_queue:
            metrics.SLOW_CLOSES.inc()
            log.warning("closing slow client %s (queue full)", self.id)
            self.close_soon(CLOSE_SLOW, "slow consumer: send queue full")
            return
        self._queue.append(frame)
        self._drained.clear()
        self._ready.set()

    async def take(self) -> list[str]:
        """Wait for queued frames and return them all (socket-less use)."""
        await self._ready.wait()
        self._ready.clear()
        frames = list(self._queue)
        self._queue.clear()
        return frames

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

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
        ws = self.websocket
        assert ws is not None
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                sent = 0
                while self._queue:
                    await ws.send_text(self._queue.popleft())
                    sent += 1
                metrics.FRAMES_OUT.inc(sent)
                self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The peer went away; the reader side notices and cleans up.
            self.closed = True

    def close_soon(self, code: int, reason: str = "") -> None:
        """Stop sending and close the socket in the background."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._queue.clear()
        self._ready.set()
        asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writer
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
            self.finished.set()
            # The reader may wait for a frame that never comes: stop it.
            if self.reader is not None and not self.reader.done():
                self.reader.cancel()

    async def drain_and_stop(self, timeout: float = 2.0) -> None:
        """Flush what is queued (best effort), then stop the writer."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if not self.closed:
                    await self._drained.wait()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
