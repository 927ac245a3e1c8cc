"""``Dashboards``: updates go out in version order, also from two
instances, and a bus reconnection brings subscribers a fresh snapshot; on
the running server's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.auth import Principal
from chathub.server.bus import MemoryBus, ReconnectHandler
from chathub.server.connection import Connection
from chathub.server.dashboards import CHANNEL, Dashboards
from chathub.server.hub import Hub
from chathub.server.redis_bus import RedisBus
from chathub.server.session_log import MemorySessionLog
from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as repo
from tests.harness import REDIS_URL, RunningServer, TeamFixture, eventually, make_team, server_on


class ReconnectingBus(MemoryBus):
    """The in-process bus, plus a reconnection the test triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.reconnect_handlers: list[ReconnectHandler] = []

    def on_reconnect(self, handler: ReconnectHandler) -> Callable[[], None]:
        self.reconnect_handlers.append(handler)
        return lambda: self.reconnect_handlers.remove(handler)

    async def reconnected(self) -> None:
        for handler in self.reconnect_handlers:
            result = handler()
            if result is not None:
                await result


@pytest.mark.redis
@pytest.mark.postgres
async def test_updates_of_two_instances_go_out_in_version_order(tmp_path: Path) -> None:
    """Two instances write to one team's dashboard at once: the first holds
    the team's lock and takes its time to commit, the second waits for the
    lock. The first's update is out before the second counts its version,
    so every subscriber sees them in version order."""
    async with server_on("postgres", tmp_path) as server:
        await _two_writers(server, await make_team(server.state))


async def _two_writers(server: RunningServer, team: TeamFixture) -> None:
    sm = server.state.sessionmaker
    prefix = f"chathub-test-{secrets.token_hex(4)}"
    buses = [RedisBus(REDIS_URL, prefix=prefix) for _ in range(3)]
    for bus in buses:
        await bus.start()
    a, b = (Dashboards(sessionmaker=sm, bus=bus, hub=Hub(MemorySessionLog())) for bus in buses[:2])
    seen: list[int] = []
    buses[2].subscribe(CHANNEL, lambda message: seen.append(message["version"]))
    locked = asyncio.Event()

    async def write(dashboards: Dashboards, key: str, hold_s: float) -> int:
        async with transaction(sm) as db:
            await repo.set_state(
                db, team_id=team.team_id, key=key, value=1, author_kind="user", updated_by=None
            )
            locked.set()
            version = await repo.dashboard_version(db, team_id=team.team_id)
            await dashboards.publish(team.team_id, version, {"states": []})
            await asyncio.sleep(hold_s)  # a slow commit
        return version

    try:
        first = asyncio.create_task(write(a, "first", 0.3))
        await locked.wait()
        second = await write(b, "second", 0)
        assert (await first) < second
        await eventually(lambda: len(seen) == 2)
        assert seen == sorted(seen), seen
    finally:
        a.close()
        b.close()
        for bus in buses:
            await bus.close()


async def test_a_reconnection_sends_each_subscriber_a_fresh_snapshot(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    sm = clean_server.state.sessionmaker
    bus = ReconnectingBus()
    hub = Hub(MemorySessionLog())
    dashboards = Dashboards(sessionmaker=sm, bus=bus, hub=hub)
    conn = Connection(None, "c1", Principal("m1", team.team_id, "viewer"), max_queue=100)
    try:
        hub.subscribe_dashboard(conn)
        first = await dashboards.snapshot(team.team_id)
        assert hub.dashboard_ready(conn, first["version"]) == []
        # Written while the bus was down: its update never arrives.
        async with transaction(sm) as db:
            await write_state(db, team.team_id)
        await bus.reconnected()
        frames = [orjson.loads(frame) for frame in await asyncio.wait_for(conn.take(), 5)]
        assert [f["type"] for f in frames] == ["dashboard.snapshot"]
        assert frames[0]["version"] == first["version"] + 1
        assert [s["key"] for s in frames[0]["states"]] == ["lost"]
    finally:
        dashboards.close()


async def test_a_snapshot_read_during_a_reconnection_is_read_again(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    sm = clean_server.state.sessionmaker
    bus = ReconnectingBus()
    reads = 0

    @asynccontextmanager
    async def session() -> Any:
        nonlocal reads
        reads += 1
        async with sm() as db:
            yield db
        if reads == 1:  # the bus came back while this read was under way
            async with transaction(sm) as db:
                await write_state(db, team.team_id)
            await bus.reconnected()

    hub = Hub(MemorySessionLog())
    dashboards = Dashboards(sessionmaker=session, bus=bus, hub=hub)  # type: ignore[arg-type]
    try:
        snapshot = await dashboards.snapshot(team.team_id)
        assert reads == 2
        assert [s["key"] for s in snapshot["states"]] == ["lost"]
    finally:
        dashboards.close()


async def write_state(db: AsyncSession, team_id: str) -> None:
    await repo.set_state(
        db, team_id=team_id, key="lost", value=1, author_kind="user", updated_by=None
    )
