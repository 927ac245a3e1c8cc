"""A dashboard subscriber stays whole across a reconnect of its instance's bus.

The Redis bus is at most once: what is published while an instance's pub/sub
connection is down never reaches that instance. Once it is subscribed again,
its dashboard subscribers get a fresh ``dashboard.snapshot``, so a client
that follows the protocol ends up with the current dashboard.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from chathub.server.redis_bus import RedisBus
from tests.harness import REDIS_URL, eventually, http_client, make_team, server_on
from tests.server.test_session_log_contract import kill_client, pubsub_client_ids
from tests.wsclient import WsClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(60)]

# Below the snapshot's 100 states, so every key written is on it.
MAX_WRITES = 90


class Board:
    """A client's dashboard, kept by the protocol's rules: a snapshot
    replaces it; an update counts only if its version is above the one held."""

    def __init__(self) -> None:
        self.version = -1
        self.states: dict[str, Any] = {}
        self.snapshots = 0

    def apply(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "dashboard.snapshot":
            self.snapshots += 1
            self.version = frame["version"]
            self.states = {s["key"]: s["value"] for s in frame["states"]}
        elif frame["type"] == "dashboard.updated" and frame["version"] > self.version:
            self.version = frame["version"]
            self.states |= {s["key"]: s["value"] for s in frame.get("states", ())}


async def test_after_a_bus_reconnect_subscribers_get_a_fresh_snapshot(tmp_path: Path) -> None:
    async with server_on("postgres", tmp_path, redis_url=REDIS_URL) as server:
        bus = server.state.bus
        assert isinstance(bus, RedisBus)
        team = await make_team(server.state, "Reconnect")
        headers = team.owner.headers
        ws = await WsClient.connect(server.ws_url, team.owner.api_key)
        try:
            async with http_client(server) as http:
                board = Board()
                ack = await ws.request({"type": "subscribe", "channel": "dashboard"})
                assert ack["type"] == "ack"
                board.apply(await ws.expect("dashboard.snapshot"))
                (old_id,) = await pubsub_client_ids(bus.subscription.name)

                async def put(i: int) -> None:
                    r = await http.put(
                        f"/dashboard/states/k{i}", json={"value": i}, headers=headers
                    )
                    assert r.status_code == 200, r.text

                # One write after another, from before the kill until the bus
                # is subscribed again: some are published while it is down.
                reconnected = asyncio.Event()

                async def write() -> int:
                    i = 0
                    while i < MAX_WRITES and not reconnected.is_set():
                        await put(i)
                        i += 1
                    return i

                writer = asyncio.create_task(write())
                await asyncio.sleep(0.02)
                await kill_client(old_id)
                await eventually(lambda: bus.subscription.connects == 2)
                await eventually(lambda: bus.subscription.connected)
                reconnected.set()
                written = await writer
                for i in range(written, written + 3):  # and after it
                    await put(i)

                final = await current_dashboard(http, headers)
                assert len(final["states"]) == written + 3
                await read_until_level(ws, board, final["version"])
        finally:
            await ws.close()

    assert board.snapshots == 2  # the one of the subscribe, and one after the reconnect
    assert board.version == final["version"]
    assert board.states == {s["key"]: s["value"] for s in final["states"]}


async def current_dashboard(http: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    r = await http.get("/dashboard", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def read_until_level(ws: WsClient, board: Board, version: int) -> None:
    """Apply frames until the board is at ``version`` and nothing more comes
    for a moment (a late snapshot still counts)."""
    while True:
        try:
            frame = await ws.recv(timeout=1.0 if board.version >= version else 5.0)
        except TimeoutError:
            return
        board.apply(frame)
