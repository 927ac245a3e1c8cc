"""Live dashboards: snapshots for new subscribers, updates pushed to every
instance's subscribed sockets through the bus.

Order
    A client ignores an update whose version is not above the one it holds,
    so updates must go out in the order their versions were counted. A
    writer counts its version while its transaction holds the team's
    dashboard lock, and hands its update to :meth:`Dashboards.announce`
    right then: the updates of a team queue here in version order, each is
    published once its transaction has committed (dropped if it does not),
    and none before those ahead of it. Across instances only the moment
    between a commit and its publish can reorder two updates.

Bus reconnections
    The bus is at most once: what is published while this instance's
    subscription is down never reaches it. Once the subscription is back,
    every dashboard subscriber here gets a fresh ``dashboard.snapshot`` (one
    read per team), then the updates held meanwhile that are newer than it,
    as on ``subscribe``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction

from chathub.server.bus import Bus
from chathub.server.frames import encode
from chathub.server.hub import Hub
from chathub.storage.repositories import dashboard as repo

log = logging.getLogger("chathub.dashboards")

CHANNEL = "dashboard"


class _Update:
    __slots__ = ("committed", "message", "sent", "version")

    def __init__(
        self, team_id: str, version: int, changes: dict[str, Any], *, committed: bool
    ) -> None:
        self.version = version
        self.message = {"team_id": team_id, "version": version, **changes}
        self.committed = committed
        self.sent = asyncio.Event()


class Dashboards:
    def __init__(
        self, *, sessionmaker: async_sessionmaker[AsyncSession], bus: Bus, hub: Hub
    ) -> None:
        self.sessionmaker = sessionmaker
        self.bus = bus
        self.hub = hub
        # team -> its updates not published yet, in version order.
        self._outbox: dict[str, deque[_Update]] = {}
        # team -> the task publishing its updates, while there is one.
        self._senders: dict[str, asyncio.Task[None]] = {}
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

    def announce(
        self, db: AsyncSession, team_id: str, version: int, changes: dict[str, Any]
    ) -> None:
        """Publish ``changes`` at ``version`` once ``db``'s transaction has
        committed; nothing if it rolls back. Call it right after counting
        ``version`` in that transaction, once it has written (and so holds
        the team's dashboard lock)."""
        update = _Update(team_id, version, changes, committed=False)
        session = db.sync_session
        root = session.get_transaction()
        if root is None:
            raise RuntimeError("announce() needs the transaction that made the change")
        self._queue(team_id, update)

        def committed(session: Session) -> None:
            if not session.in_nested_transaction():  # not a savepoint's release
                update.committed = True

        def ended(session: Session, transaction: SessionTransaction) -> None:
            if transaction is not root:
                return
            if not update.committed:
                self._drop(team_id, update)
            self._pump(team_id)

        event.listen(session, "after_commit", committed)
        event.listen(session, "after_transaction_end", ended)

    async def publish(self, team_id: str, version: int, changes: dict[str, Any]) -> None:
        """Tell every instance's subscribers of ``team_id`` what changed, for
        a change already committed; returns once it is published. It goes
        out in version order with the updates still queued here."""
        update = _Update(team_id, version, changes, committed=True)
        self._queue(team_id, update)
        self._pump(team_id)
        await update.sent.wait()

    def _queue(self, team_id: str, update: _Update) -> None:
        queue = self._outbox.setdefault(team_id, deque())
        at = len(queue)
        while at and queue[at - 1].version > update.version:
            at -= 1
        queue.insert(at, update)

    def _drop(self, team_id: str, update: _Update) -> None:
        queue = self._outbox.get(team_id)
        if queue is not None and update in queue:
            queue.remove(update)
            if not queue and team_id not in self._senders:
                del self._outbox[team_id]

    def _pump(self, team_id: str) -> None:
        """Start publishing the team's committed updates at the head of its
        queue, unless that is under way."""
        queue = self._outbox.get(team_id)
        if team_id in self._senders or not queue or not queue[0].committed:
            return
        task = asyncio.get_running_loop().create_task(self._send(team_id, queue))
        self._senders[team_id] = task

    async def _send(self, team_id: str, queue: deque[_Update]) -> None:
        try:
            while queue and queue[0].committed:
                update = queue.popleft()
                try:
                    await self.bus.publish(CHANNEL, update.message)
                except Exception:
                    log.exception("a dashboard update of team %s was not published", team_id)
                finally:
                    update.sent.set()
        finally:
            del self._senders[team_id]
            if not queue:
                self._outbox.pop(team_id, None)

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
        for task in list(self._senders.values()):
            task.cancel()
