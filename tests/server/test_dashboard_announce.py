"""``Dashboards``: updates go out in version order once their transaction
commits (none if it rolls back), and a bus reconnection brings subscribers a
fresh snapshot; on the running server's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.auth import Principal
from chathub.server.bus import MemoryBus
from chathub.server.connection import Connection
from chathub.server.dashboards import CHANNEL, Dashboards
from chathub.server.hub import Hub
from chathub.server.session_log import MemorySessionLog
from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as repo
from tests.harness import RunningServer, TeamFixture

ReconnectHandler = Callable[[], Awaitable[None] | None]


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


def published(bus: MemoryBus) -> list[int]:
    versions: list[int] = []
    bus.subscribe(CHANNEL, lambda message: versions.append(message["version"]))
    return versions


async def test_updates_wait_for_their_commit_and_those_before_them(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    sm = clean_server.state.sessionmaker
    team_id = team.team_id
    bus = MemoryBus()
    versions = published(bus)
    dashboards = Dashboards(sessionmaker=sm, bus=bus, hub=Hub(MemorySessionLog()))
    try:
        async with transaction(sm) as db:
            dashboards.announce(db, team_id, 5, {"states": []})
            async with db.begin_nested():  # a savepoint's release is no commit
                await write_state(db, team_id)
            # Counted after it, committed before it: still published after it.
            later = asyncio.create_task(dashboards.publish(team_id, 6, {"states": []}))
            other_team = asyncio.create_task(dashboards.publish("t2", 1, {"states": []}))
            await asyncio.wait_for(other_team, 5)
            await asyncio.sleep(0.05)
            assert versions == [1] and not later.done()
        await asyncio.wait_for(later, 5)
        assert versions == [1, 5, 6]

        with pytest.raises(RuntimeError):
            async with transaction(sm) as db:
                dashboards.announce(db, team_id, 7, {"states": []})
                raise RuntimeError("rolled back")
        await asyncio.wait_for(dashboards.publish(team_id, 8, {"states": []}), 5)
        assert versions == [1, 5, 6, 8]
    finally:
        dashboards.close()


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
