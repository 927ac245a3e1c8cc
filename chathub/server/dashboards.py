"""Live dashboards: snapshots for new subscribers, updates pushed to every
instance's subscribed sockets through the bus."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.server.bus import Bus
from chathub.server.frames import encode
from chathub.server.hub import Hub
from chathub.storage.repositories import dashboard as repo

CHANNEL = "dashboard"


class Dashboards:
    def __init__(
        self, *, sessionmaker: async_sessionmaker[AsyncSession], bus: Bus, hub: Hub
    ) -> None:
        self.sessionmaker = sessionmaker
        self.bus = bus
        self.hub = hub
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_update)

    async def snapshot(self, team_id: str) -> dict[str, Any]:
        async with self.sessionmaker() as db:
            view = await repo.dashboard(db, team_id=team_id)
        return {"type": "dashboard.snapshot", **view.as_dict()}

    async def publish(self, team_id: str, version: int, changes: dict[str, Any]) -> None:
        """Tell every instance's subscribers of ``team_id`` what changed."""
        await self.bus.publish(CHANNEL, {"team_id": team_id, "version": version, **changes})

    def _on_update(self, message: dict[str, Any]) -> None:
        team_id = message.pop("team_id", None)
        version = message.get("version")
        if isinstance(team_id, str) and isinstance(version, int):
            frame = encode({"type": "dashboard.updated", **message})
            self.hub.send_dashboard(team_id, version, frame)

    def close(self) -> None:
        self._unsubscribe()
