"""Live dashboards: snapshots for new subscribers, updates pushed to every
instance's subscribed sockets through the bus.

Order
    A client ignores an update whose version is not above the one it holds,
    so updates must reach it in the order their versions were counted. A
    writer counts its version while its transaction holds the team's
    dashboard lock (taken by its write) and publishes its update then, from
    inside that transaction (:meth:`Dashboards.publish`): the next writer
    of the team, on any instance, counts its version only after this one
    has committed, and so publishes after this update is out. Should a
    commit fail after its publish, subscribers were told of a change that
    did not happen, until their next snapshot.

Bus reconnections
    The bus is at most once: what is published while this instance's
    subscription is down never reaches it. Once the subscription is back,
    every dashboard subscriber here gets a fresh ``dashboard.snapshot`` (one
    read per team), then the updates held meanwhile that are newer than it,
    as on ``subscribe``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.server.bus import Bus
from chathub.server.frames import encode
from chathub.server.hub import Hub
from chathub.storage.repositories import dashboard as repo

log = logging.getLogger("chathub.dashboards")

CHANNEL = "dashboard"


class Dashboards:
    def __init__(
        self, *, sessionmaker: async_sessionmaker[AsyncSession], bus: Bus, hub: Hub
    ) -> None:
        self.sessionmaker = sessionmaker
        self.bus = bus
        self.hub = hub
        self._reconnections = 0
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_update)
        self._unregister = bus.on_reconnect(self._on_reconnect)

    async def snapshot(self, team_id: str) -> dict[str, Any]:
        """The team's dashboard as a ``dashboard.snapshot`` frame. Read again
        if the bus reconnected meanwhile: updates it lost may have committed
        after the read began."""
        while True:
            reconnections = self._reconnections
            async with self.sessionmaker() as db:
                view = await repo.dashboard(db, team_id=team_id)
            if reconnections == self._reconnections:
                return {"type": "dashboard.snapshot", **view.as_dict()}

    async def publish(self, team_id: str, version: int, changes: dict[str, Any]) -> None:
        """Tell every instance's subscribers of ``team_id`` what changed.
        Call it from inside the writer's transaction, once it has written and
        counted ``version`` (see Order above). A publish that fails is logged
        and the write goes on: the update is lost, as one the bus drops."""
        try:
            await self.bus.publish(CHANNEL, {"team_id": team_id, "version": version, **changes})
        except Exception:
            log.exception("a dashboard update of team %s was not published", team_id)

    def _on_update(self, message: dict[str, Any]) -> None:
        team_id = message.pop("team_id", None)
        version = message.get("version")
        if isinstance(team_id, str) and isinstance(version, int):
            frame = encode({"type": "dashboard.updated", **message})
            self.hub.send_dashboard(team_id, version, frame)

    def _on_reconnect(self) -> Awaitable[None] | None:
        """Runs before the bus hands out anything received after it is back:
        the subscribers hold their updates from here on."""
        self._reconnections += 1
        teams = self.hub.resync_dashboards(self._reconnections)
        return self._resync(self._reconnections, teams) if teams else None

    async def _resync(self, reconnection: int, teams: list[str]) -> None:
        for team_id in teams:
            snapshot: tuple[int, str] | None = None
            try:
                async with self.sessionmaker() as db:
                    view = await repo.dashboard(db, team_id=team_id)
                snapshot = (view.version, encode({"type": "dashboard.snapshot", **view.as_dict()}))
            except Exception:
                log.exception("no dashboard snapshot for team %s after a bus reconnection", team_id)
            self.hub.dashboard_resynced(team_id, reconnection, snapshot)

    def close(self) -> None:
        self._unsubscribe()
        self._unregister()
