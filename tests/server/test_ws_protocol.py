"""The WebSocket protocol chathub serves with (chathub.server.ws_protocol)."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from chathub.server.ws_protocol import Flag, Inbox, ws_protocol_class


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
