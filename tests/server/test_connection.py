"""A socket's send queue and writer (``chathub.server.connection``), on its own.

The socket here is a recording stand-in with Starlette's ``send_text`` and
``close``, and, for :class:`DirectSocket`, the synchronous send that
chathub's uvicorn protocol offers in the scope; real sockets exercise the
same class in test_ws.py. What is checked: frames leave in order through one
writer at a time, a writer lingers for the next frame and then ends (an idle
socket keeps no task), draining or closing never waits for the linger, and
with the synchronous send the frames of one loop turn go out together at its
end while the transport takes data, and queue, in order, while it is paused.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.websockets import WebSocketState

from chathub import logs
from chathub.auth import Principal
from chathub.server import connection as connection_module
from chathub.server.connection import Connection
from chathub.server.ws_protocol import SEND_NOW
from tests.harness import eventually

LINGER_S = 0.05


class RecordingSocket:
    """Records sent frames; each send yields to the loop once, as a real
    socket may, and counts how many sends overlap."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.in_send = 0
        self.most_in_send = 0
        self.application_state = WebSocketState.CONNECTED
        self.closed_with: tuple[int, str] | None = None
        self.scope: dict[str, object] = {"type": "websocket", "extensions": {}}

    async def send_text(self, frame: str) -> None:
        self.in_send += 1
        self.most_in_send = max(self.most_in_send, self.in_send)
        try:
            await asyncio.sleep(0)
            self.sent.append(frame)
        finally:
            self.in_send -= 1

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED


class DirectSocket(RecordingSocket):
    """Also offers the synchronous send; its transport can be paused, which
    makes that send refuse and ``send_text`` wait, as uvicorn's does."""

    def __init__(self) -> None:
        super().__init__()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.writes: list[list[str]] = []  # one entry per synchronous write
        self.scope = {"type": "websocket", "extensions": {SEND_NOW: {"send_texts": self.now}}}

    @property
    def writable(self) -> bool:
        return self._resumed.is_set()

    @writable.setter
    def writable(self, value: bool) -> None:
        if value:
            self._resumed.set()
        else:
            self._resumed.clear()

    def now(self, texts: list[str]) -> bool:
        if not self.writable:
            return False
        batch = list(texts)
        self.writes.append(batch)
        self.sent.extend(batch)
        return True

    async def send_text(self, frame: str) -> None:
        self.in_send += 1
        self.most_in_send = max(self.most_in_send, self.in_send)
        try:
            await self._resumed.wait()
            self.sent.append(frame)
        finally:
            self.in_send -= 1


@pytest.fixture(autouse=True)
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "WRITER_LINGER_S", LINGER_S)


def new_connection(socket: RecordingSocket, max_queue: int = 1000) -> Connection:
    principal = Principal(member_id="m", team_id="t", role="member")
    return Connection(socket, "c1", principal, max_queue)  # type: ignore[arg-type]


async def settle(socket: RecordingSocket, sent: int) -> None:
    """Until ``sent`` frames have gone out."""
    await eventually(lambda: len(socket.sent) >= sent, timeout_s=2)


async def test_frames_leave_in_order_through_one_writer() -> None:
    socket = RecordingSocket()
    conn = new_connection(socket)
    for burst in range(5):
        for k in range(20):
            conn.send(f"{burst}-{k}")
        await asyncio.sleep(0)  # the writer is mid-send while more arrive
    await settle(socket, 100)
    assert socket.sent == [f"{b}-{k}" for b in range(5) for k in range(20)]
    assert socket.most_in_send == 1


async def test_a_streaming_socket_reuses_its_writer_and_an_idle_one_keeps_none() -> None:
    socket = RecordingSocket()
    conn = new_connection(socket)
    conn.send("a")
    writer = conn._writer
    assert writer is not None
    await settle(socket, 1)
    conn.send("b")  # within the linger: the same task sends it
    await settle(socket, 2)
    assert conn._writer is writer
    await asyncio.wait_for(writer, 1)  # no frame for the linger: it ends
    assert conn._writer is None and conn.queue_depth == 0
    conn.send("c")  # and the next frame starts a new one
    assert conn._writer is not None and conn._writer is not writer
    await settle(socket, 3)
    assert socket.sent == ["a", "b", "c"]


async def test_drain_flushes_the_queue_without_waiting_for_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_module, "WRITER_LINGER_S", 30.0)
    socket = RecordingSocket()
    conn = new_connection(socket)
    for k in range(10):
        conn.send(str(k))
    async with asyncio.timeout(1):
        await conn.drain_and_stop(timeout=5)
    assert socket.sent == [str(k) for k in range(10)]
    assert conn._writer is None
    conn.send("late")  # stopped for good: no writer starts again
    assert conn._writer is None


async def test_closing_wakes_a_lingering_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "WRITER_LINGER_S", 30.0)
    socket = RecordingSocket()
    conn = new_connection(socket)
    conn.send("x")
    await settle(socket, 1)
    writer = conn._writer
    assert writer is not None and not writer.done()
    conn.close_soon(4000, "bye")
    await eventually(lambda: conn.finished, timeout_s=1)
    assert writer.done() and conn._writer is None
    assert socket.closed_with == (4000, "bye")


async def test_a_full_queue_closes_the_socket_as_slow() -> None:
    socket = RecordingSocket()
    conn = new_connection(socket, max_queue=3)
    for k in range(4):  # no await: the writer has not run yet
        conn.send(str(k))
    assert conn.closed and conn.close_code == connection_module.CLOSE_SLOW
    await eventually(lambda: conn.finished, timeout_s=1)
    assert socket.closed_with is not None and socket.closed_with[0] == 4408
    assert socket.sent == []


async def test_the_frames_of_a_loop_turn_go_out_at_its_end_in_one_write_with_no_task() -> None:
    sockets = [DirectSocket(), DirectSocket()]
    conns = [new_connection(socket) for socket in sockets]
    for k in range(5):
        for conn in conns:
            conn.send(str(k))
    assert all(socket.sent == [] for socket in sockets)  # held until the turn ends
    await asyncio.sleep(0)
    for socket, conn in zip(sockets, conns, strict=True):
        assert socket.writes == [["0", "1", "2", "3", "4"]]
        assert conn._writer is None and conn.queue_depth == 0
    conns[0].send("5")  # a later turn: a write of its own
    await asyncio.sleep(0)
    assert sockets[0].writes[-1] == ["5"] and sockets[1].writes == [["0", "1", "2", "3", "4"]]


async def test_the_end_of_turn_write_logs_with_no_task_s_ids() -> None:
    class BrokenSocket(DirectSocket):
        def now(self, texts: list[str]) -> bool:
            raise OSError("gone")

    class Ids(logging.Handler):
        """The ids bound where each record is logged."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, str | None, str | None]] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append((record.getMessage(), logs.reply_id.get(), logs.session_id.get()))

    conn = new_connection(BrokenSocket())

    async def a_reply() -> None:
        logs.bind(reply="r-1", session="s-1")
        conn.send("x")  # the turn's first frame: it schedules the write

    ids = Ids()
    logger = logging.getLogger("chathub.ws")
    logger.addHandler(ids)
    try:
        await asyncio.create_task(a_reply())
        await asyncio.sleep(0)
    finally:
        logger.removeHandler(ids)
    # Written for every socket at once: not the reply's record.
    assert ids.seen == [("writing to c1 failed", None, None)]


async def test_frames_held_for_the_end_of_the_turn_go_out_before_a_close() -> None:
    socket = DirectSocket()
    conn = new_connection(socket)
    conn.send("last words")
    conn.close_soon(1000, "bye")
    await eventually(lambda: socket.closed_with is not None, timeout_s=2)
    assert socket.sent == ["last words"] and socket.closed_with == (1000, "bye")


async def test_a_paused_transport_queues_frames_and_keeps_their_order() -> None:
    socket = DirectSocket()
    conn = new_connection(socket, max_queue=100)
    conn.send("a")
    await asyncio.sleep(0)  # written at the end of the turn
    socket.writable = False  # the peer stopped reading
    for frame in ("b", "c", "d"):
        conn.send(frame)
    await asyncio.sleep(0)  # the turn is over; the transport took nothing
    assert conn.queue_depth == 3 and conn._writer is not None
    await asyncio.sleep(0.01)  # the writer took "b" and waits for the transport
    assert conn.queue_depth == 2
    conn.send("e")  # the queue is not empty: it must not overtake b, c, d
    socket.writable = True
    await settle(socket, 5)
    assert socket.sent == ["a", "b", "c", "d", "e"]
    # "b" went by the awaitable path; the backlog behind it in one write.
    assert socket.writes == [["a"], ["c", "d", "e"]]
    writer = conn._writer
    assert writer is not None  # lingering
    conn.send("f")  # a lingering writer is in no send: "f" goes at the turn's end
    await asyncio.sleep(0)
    assert socket.sent[-1] == "f" and socket.writes[-1] == ["f"]
    await asyncio.wait_for(writer, 1)
    assert conn._writer is None and conn.queue_depth == 0


async def test_a_frame_never_overtakes_one_the_writer_is_sending() -> None:
    socket = DirectSocket()
    conn = new_connection(socket, max_queue=100)
    socket.writable = False
    conn.send("first")
    await asyncio.sleep(0.01)  # the writer holds "first", waiting: queue empty
    assert conn.queue_depth == 0 and socket.sent == []
    socket.writable = True  # writable again, before the writer runs
    conn.send("second")
    await settle(socket, 2)
    assert socket.sent == ["first", "second"]
