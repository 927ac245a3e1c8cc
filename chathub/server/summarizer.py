"""Rolling summaries: when a session's history outgrows the prompt, the
turns that no longer fit are summarised (by the server's default provider) into a
new, stored version of the session's summary, which later prompts carry.

A summary is background work (``CompletionRequest.background``): on the
embedded model a user's reply stops it (:class:`ProviderPreempted`). Nothing
is stored then; the next reply that leaves turns out schedules it again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub import logs
from chathub.llm.base import LLMProvider, ProviderPreempted, TextDelta
from chathub.llm.context import Counter, HistoryItem, summary_prompt
from chathub.llm.retry import stream_with_retry
from chathub.storage.db import transaction
from chathub.storage.repositories import summaries

log = logging.getLogger("chathub.summaries")

HISTORY_LIMIT = 400
"""The newest messages after the summary that a prompt is built from."""
SUMMARY_KEEP_NEWEST = 6
"""Turns a refresh leaves out: the next prompt sends them as they are."""


class SessionSummarizer:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        provider: LLMProvider,
        count: Counter,
        window: int | None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.provider = provider
        self.count = count
        self.window = window
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def schedule(self, team_id: str, session_id: str) -> None:
        """Refresh the session's summary in the background (one refresh per
        session at a time)."""
        if self._closed or session_id in self._running:
            return
        task = asyncio.create_task(self.refresh(team_id, session_id))
        self._running[session_id] = task
        task.add_done_callback(lambda _t: self._running.pop(session_id, None))

    async def refresh(self, team_id: str, session_id: str) -> None:
        logs.bind(team=team_id, session=session_id, reply=None)
        try:
            async with self.sessionmaker() as db:
                previous = await summaries.latest(db, session_id=session_id)
                rows = await summaries.history_after(
                    db,
                    session_id=session_id,
                    after_id=previous.covers_until if previous else None,
                    limit=HISTORY_LIMIT + SUMMARY_KEEP_NEWEST,
                    newest=False,
                )
            # Summarise what the last prompt could not hold: all but the
            # newest turns, as much of it as one summary request can take.
            older = [HistoryItem(m.role, m.content, m.id) for m in rows[:-SUMMARY_KEEP_NEWEST]]
            if not older:
                return
            budget = (self.window or 8192) - 1024
            picked: list[HistoryItem] = []
            for item in older:
                request = summary_prompt(previous.text if previous else None, [*picked, item])
                if picked and await self.count(request) > budget:
                    break
                picked.append(item)
            request = dataclasses.replace(
                summary_prompt(previous.text if previous else None, picked), background=True
            )
            parts: list[str] = []
            async for event in stream_with_retry(self.provider, request):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
            text = "".join(parts).strip()
            if not text:
                return
            async with transaction(self.sessionmaker) as db:
                await summaries.add(
                    db,
                    team_id=team_id,
                    session_id=session_id,
                    text=text,
                    covers_until=picked[-1].id,
                )
        except ProviderPreempted:
            log.info("summary refresh of session %s gave way to a reply", session_id)
        except Exception:
            log.exception("summary refresh of session %s failed", session_id)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(BaseException):
                await task
