"""The WebSocket protocol chathub serves with (chathub.server.ws_protocol)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import websockets
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode

from chathub.server import ws_protocol
from chathub.server.ws_protocol import SEND_NOW, Flag, Inbox, text_frame, ws_protocol_class
from tests.harness import serve, server_on


def test_serves_with_the_lean_subclass_of_uvicorns_sansio_protocol() -> None:
    cls = ws_protocol_class()
    assert isinstance(cls, type) and issubclass(cls, WebSocketsSansIOProtocol)


async def test_inbox_hands_items_over_in_order_to_a_waiting_reader() -> None:
    inbox = Inbox()
    assert inbox.empty()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert await reader == 1
    assert not inbox.empty()
    assert await inbox.get() == 2
    assert inbox.empty()


async def test_a_cancelled_reader_leaves_the_item_for_the_next() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("x")
    first.cancel()  # woken, then cancelled before it ran
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == "x"


async def test_flag_blocks_only_while_clear() -> None:
    flag = Flag()
    assert await flag.wait()
    flag.clear()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    flag.set()
    assert await asyncio.wait_for(waiter, 1)


LONG = "ñ" * 40_000  # 80,000 bytes: the 8-byte length form


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "deflate"])
async def test_the_synchronous_send_writes_frames_in_order_and_refuses_once_closed(
    compression: bool,
) -> None:
    """Over real sockets: the scope offers the extension; a batch arrives as
    separate frames, in order, the same texts on two sockets (framed once,
    or per socket when compressed); after the peer closes, nothing is
    written."""
    results: list[dict[str, Any]] = []
    done = asyncio.Event()
    texts = ["one", "x" * 200, LONG]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        result: dict[str, Any] = {}
        results.append(result)
        assert (await receive())["type"] == "websocket.connect"
        send_texts = scope["extensions"][SEND_NOW]["send_texts"]
        result["before_accept"] = send_texts(["too early"])
        await send({"type": "websocket.accept"})
        result["batch"] = send_texts(texts)
        result["single"] = send_texts(["four"])
        message = await receive()  # the client's close
        result["closed_with"] = message.get("code")
        result["after_close"] = send_texts(["too late"])
        if len(results) == 2 and all("after_close" in r for r in results):
            done.set()

    server, task, port = await serve(
        app, lifespan="off", ws=ws_protocol_class(), ws_per_message_deflate=compression
    )
    received: list[list[str | bytes]] = []
    try:
        url = f"ws://127.0.0.1:{port}/"
        async with (
            websockets.connect(url, max_size=None) as a,
            websockets.connect(url, max_size=None) as b,
        ):
            for client in (a, b):
                negotiated = client.response.headers.get("Sec-WebSocket-Extensions")
                assert bool(negotiated) is compression
                received.append([await asyncio.wait_for(client.recv(), 5) for _ in range(4)])
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)
    assert received == [[*texts, "four"]] * 2
    assert (
        results
        == [
            {
                "before_accept": False,
                "batch": True,
                "single": True,
                "closed_with": 1000,
                "after_close": False,
            }
        ]
        * 2
    )


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_text_frame_is_framed_as_websockets_frames_it(size: int) -> None:
    text = ("añb" * size)[:size]  # multi-byte characters: the length is in bytes
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert text_frame(text) == expected


async def test_a_request_head_that_takes_too_long_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and sends nothing, or a header line now and
    then, loses its connection once the head's time is up; a request whose
    head is complete in time is served, and so is the next one on the same
    connection."""
    monkeypatch.setattr(ws_protocol, "HEAD_TIMEOUT_S", 0.5, raising=False)
    async with server_on("sqlite", tmp_path) as srv:
        silent = await asyncio.open_connection("127.0.0.1", srv.port)
        slow = await asyncio.open_connection("127.0.0.1", srv.port)
        slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        await slow[1].drain()
        try:
            for reader, _ in (silent, slow):
                async with asyncio.timeout(10):  # closed after 0.5 s, or never
                    assert await reader.read() == b""
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                for pause in (0.0, 0.8):  # the second head comes after a first's time
                    await asyncio.sleep(pause)
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                    async with asyncio.timeout(10):
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                    assert head.startswith(b"HTTP/1.1 200"), head
            finally:
                writer.close()
        finally:
            for _, writer in (silent, slow):
                writer.close()
