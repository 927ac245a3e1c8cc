"""The reaper: replies never end silently. Every instance runs one; it ends
replies whose generating instance died (their lease expired; exactly one
instance claims each) and, now and then, replies left streaming with no lease
at all, with ``reply.failed`` / ``interrupted`` and the partial text the
session log still holds. It never restarts a reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.config import Settings
from chathub.server import metrics
from chathub.server.leases import MemoryReplyLeases, ReplyLeases
from chathub.server.session_log import SessionLog, append_surely
from chathub.storage.db import transaction
from chathub.storage.models import utcnow
from chathub.storage.repositories import sessions as repo
from chathub.wire import message_view

log = logging.getLogger("chathub.reaper")


class ReplyReaper:
    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        session_log: SessionLog,
        leases: ReplyLeases,
        is_local: Callable[[str], bool],
    ) -> None:
        """``is_local(reply_id)``: the reply runs on this instance (never reaped)."""
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.log = session_log
        self.leases = leases
        self.is_local = is_local
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._reap_forever(), name="reply-reaper")

    async def _reap_forever(self) -> None:
        period = max(0.2, self.settings.lease_ttl_s / 2)
        sweep_every = 30
        rounds = 0
        embedded_start = isinstance(self.leases, MemoryReplyLeases)
        while True:
            try:
                if embedded_start:
                    # One process: every reply still streaming in the database
                    # at start-up belonged to a previous run of this process.
                    await self.sweep(started_before=None)
                    embedded_start = False
                await self.reap_once()
                rounds += 1
                if rounds % sweep_every == 0:
                    await self.sweep(
                        started_before=utcnow()
                        - timedelta(seconds=self.settings.reply_timeout_s + 60)
                    )
            except Exception:
                log.exception("reaper round failed")
            await asyncio.sleep(period)

    async def reap_once(self) -> int:
        """End every reply whose lease expired (its instance died); each is
        claimed by exactly one instance. Returns how many this one ended."""
        ended = 0
        for expired in await self.leases.expired():
            if self.is_local(expired.reply_id):
                continue  # ours and alive: its renewal is only late
            claimed = await self.leases.claim_expired(expired.reply_id)
            if claimed and await self.end_interrupted(expired.reply_id):
                ended += 1
        return ended

    async def sweep(self, *, started_before: datetime | None) -> int:
        """End replies left streaming with no lease at all (lost with the bus
        state, or from before a restart of the embedded server)."""
        async with self.sessionmaker() as db:
            rows = await repo.unfinished_replies(db, started_before=started_before)
        ended = 0
        for row in rows:
            if not self.is_local(row.id) and await self.end_interrupted(row.id):
                ended += 1
        return ended

    async def end_interrupted(self, reply_id: str) -> bool:
        """``reply.failed`` / ``interrupted`` with the partial text the session
        log still holds; never restarts the reply."""
        async with self.sessionmaker() as db:
            row = await repo.reply_by_id(db, reply_id=reply_id)
        if row is None or row.status != "streaming":
            return False
        events = await self.log.read_after(row.session_id, 0) or []
        partial = "".join(
            str(data.get("text", ""))
            for data in (e.data() for e in events if e.type == "reply.delta")
            if data.get("reply_id") == reply_id
        )
        async with transaction(self.sessionmaker) as db:
            finished = await repo.finish_reply_message(
                db,
                message_id=reply_id,
                content=partial,
                status="failed",
                stop_reason="error",
                usage=None,
            )
            view = message_view(finished) if finished is not None else None
        if view is None:
            return False
        event = await append_surely(
            self.log,
            row.session_id,
            "reply.failed",
            {
                "reply_id": reply_id,
                "code": "interrupted",
                "message": "the server generating this reply stopped",
                "retryable": True,
                "partial": view,
            },
        )
        metrics.REPLIES.labels(stop_reason="interrupted").inc()
        async with transaction(self.sessionmaker) as db:
            await repo.set_last_seq(db, session_id=row.session_id, seq=event.seq)
        log.warning("reply %s ended as interrupted", reply_id)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
