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
from itertools import pairwise
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.config import Settings
from chathub.llm.base import estimate_tokens
from chathub.server import metrics
from chathub.server.leases import MemoryReplyLeases, ReplyLeases
from chathub.server.session_feed import SessionFeed
from chathub.server.session_log import Event, SessionLog
from chathub.storage.db import backend_unreachable, transaction
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
        session_feed: SessionFeed | None = None,
    ) -> None:
        """``is_local(reply_id)``: the reply runs on this instance (never reaped)."""
        self.settings = settings
        self.session_feed = session_feed
        self.sessionmaker = sessionmaker
        self.log = session_log
        self.leases = leases
        self.is_local = is_local
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reaping. With in-process leases (one process), every reply
        still streaming in the database belonged to an earlier run of this
        process: those are ended first, before the server takes a message."""
        left_over = isinstance(self.leases, MemoryReplyLeases)
        if left_over:
            try:
                await self.sweep(started_before=None)
                left_over = False
            except Exception:  # the loop tries again
                log.exception("could not end the replies an earlier run left streaming")
        self._task = asyncio.create_task(self._reap_forever(left_over), name="reply-reaper")

    async def _reap_forever(self, left_over: bool) -> None:
        period = max(0.2, self.settings.lease_ttl_s / 2)
        sweep_every = 30
        # The first sweep comes a few rounds after startup, not a whole
        # interval: replicas restarted more often than that still sweep.
        rounds = sweep_every - 3
        while True:
            await asyncio.sleep(period)
            try:
                if left_over:
                    await self.sweep(started_before=None)
                    left_over = False
                await self.reap_once()
                rounds += 1
                if rounds % sweep_every == 0:
                    await self.sweep(
                        started_before=utcnow()
                        - timedelta(seconds=self.settings.reply_timeout_s + 60)
                    )
            except Exception as exc:
                if backend_unreachable(exc):
                    # Redis or PostgreSQL is down: say so, without a
                    # traceback every round; the next round tries again.
                    log.warning("reaper round skipped: %r", exc)
                else:
                    log.exception("reaper round failed")

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
        """``reply.failed`` / ``interrupted`` with the partial text: all of it
        when the session log still holds the reply from its start, else the
        last checkpoint stored with the reply, and an estimated usage
        (:func:`estimated_usage`). Never restarts the reply."""
        async with self.sessionmaker() as db:
            row = await repo.reply_by_id(db, reply_id=reply_id)
            if row is None or row.status != "streaming":
                return False
            last_seq = await repo.stored_last_seq(db, session_id=row.session_id)
            asked = await repo.content_of(db, message_id=row.reply_to) if row.reply_to else None
        streamed = streamed_text(await self.log.held(row.session_id), reply_id)
        if streamed is None:
            # The log no longer holds the reply (a reply longer than its
            # window, an embedded server that died, a Redis that lost its
            # data): its text is the last checkpoint.
            partial = row.content
            if await self.log.last_seq(row.session_id) <= last_seq:
                # And the log lost its count: the seqs the reply used after
                # its checkpoint are unknown. Skip a whole log window past
                # them, so that none is handed out again: a client that saw
                # them finds them older than the log, and reloads.
                last_seq += self.settings.session_log_length
        else:
            partial = streamed
        await self.log.ensure_floor(row.session_id, last_seq)
        async with transaction(self.sessionmaker) as db:
            finished = await repo.finish_reply_message(
                db,
                message_id=reply_id,
                content=partial,
                status="failed",
                stop_reason="error",
                usage=estimated_usage(asked or "", partial),
            )
            if finished is None:
                return False
            view = message_view(finished)
            ended_at = finished.completed_at
        event = await self.log.append(
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
            await repo.reply_ended(db, session_id=row.session_id, seq=event.seq, at=ended_at)
        if self.session_feed is not None:
            await self.session_feed.activity(
                row.team_id, row.session_id, event.seq, view["completed_at"]
            )
        log.warning("reply %s ended as interrupted", reply_id)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def estimated_usage(asked: str, partial: str) -> dict[str, Any]:
    """The usage stored with a reply the reaper ends, marked ``estimated``
    as every usage the provider never sent is (see ``_usage_view`` in
    ``server/replies.py``). Output: the partial text, one token per four
    characters. Input: the prompt died with the instance that built it
    (system prompt, summary, history, file excerpts), so the reaper counts
    the one part of it it can read back cheaply, the message being answered
    (``asked``): a lower bound, never more than the prompt was."""
    return {
        "input_tokens": estimate_tokens(asked),
        "output_tokens": estimate_tokens(partial),
        "estimated": True,
    }


def streamed_text(events: list[Event], reply_id: str) -> str | None:
    """The concatenated deltas of ``reply_id`` among ``events``; None unless
    they hold the reply whole: its ``reply.started`` and, from there, every
    ``seq`` with no gap."""
    start = next(
        (
            i
            for i, e in enumerate(events)
            if e.type == "reply.started" and e.data().get("reply_id") == reply_id
        ),
        None,
    )
    if start is None:
        return None
    pieces = []
    for before, event in pairwise(events[start:]):
        if event.seq != before.seq + 1:
            return None
        if event.type == "reply.delta":
            data = event.data()
            if data.get("reply_id") == reply_id:
                pieces.append(str(data.get("text", "")))
    return "".join(pieces)
