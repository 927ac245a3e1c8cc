"""Running extraction after replies and keeping the dashboard current.

After a reply completes, extraction for its session is scheduled, debounced:
a burst of replies gives one run. A run extracts from the messages since the
last run, writes what is new or changed as new versions (author ``model`` or
``extractor``), and publishes ``dashboard.updated``. After a run that changed
something, the model rewrites the team's dashboard summary (versioned), which
is published too; debounced per team as well, so a burst of runs gives one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import asdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub import logs
from chathub.errors import ChathubError
from chathub.llm.base import ChatTurn, CompletionRequest, LLMProvider, TextDelta
from chathub.llm.extraction import (
    KnownTask,
    Source,
    extract,
    new_insights,
    plan_task_changes,
)
from chathub.llm.retry import stream_with_retry
from chathub.server.dashboards import Dashboards
from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as board
from chathub.storage.repositories import summaries

log = logging.getLogger("chathub.extraction")

WINDOW = 12
"""Messages read per run at most (the newest since the last run)."""
KNOWN_LIMIT = 100
"""Newest tasks and insights a run compares what it found with (besides
every open task, up to :data:`OPEN_LIMIT`)."""
OPEN_LIMIT = 1000
LAST_SEEN_LIMIT = 10_000
"""Sessions whose last extracted message is remembered."""


async def _known_tasks(db: AsyncSession, team_id: str) -> list[board.TaskView]:
    """The tasks a run deduplicates against: the newest, and every open one
    however old (a task mentioned again is most often one still open)."""
    newest = await board.list_tasks(db, team_id=team_id, limit=KNOWN_LIMIT, cursor=None)
    tasks = {t.id: t for t in newest.items}
    cursor: str | None = None
    while len(tasks) < KNOWN_LIMIT + OPEN_LIMIT:
        page = await board.list_tasks(
            db, team_id=team_id, limit=KNOWN_LIMIT, cursor=cursor, status="open"
        )
        tasks.update((t.id, t) for t in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    return list(tasks.values())


class Debounced:
    """``run(key)`` ``delay_s`` after the last ``schedule(key)``, one run per
    key at a time: a key scheduled while it runs runs again after."""

    def __init__(self, delay_s: float, run: Callable[[Any], Coroutine[Any, Any, object]]) -> None:
        self.delay_s = delay_s
        self._run = run
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._running: dict[Hashable, asyncio.Task[object]] = {}
        self._closed = False

    def schedule(self, key: Hashable) -> None:
        if self._closed:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.delay_s, self._start, key)

    def _start(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        if key in self._running:  # catch up after the run
            self.schedule(key)
            return
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._running[key] = task
        task.add_done_callback(lambda _t: self._running.pop(key, None))

    @property
    def idle(self) -> bool:
        return not self._timers and not self._running

    async def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(BaseException):
                await task


class Extractor:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        provider: LLMProvider,
        dashboards: Dashboards,
        debounce_s: float = 1.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.provider = provider
        self.dashboards = dashboards
        self.debounce_s = debounce_s
        self._extractions = Debounced(debounce_s, self._run_quietly)
        self._summaries = Debounced(debounce_s, self._summarise_quietly)
        # The last message each session's extraction read, for the sessions
        # seen most recently (one forgotten re-reads its newest messages,
        # which deduplication absorbs).
        self._last_seen: OrderedDict[str, str] = OrderedDict()
        self._providers: dict[str, LLMProvider] = {}

    def schedule(self, team_id: str, session_id: str, provider: LLMProvider | None = None) -> None:
        """Run extraction for the session ``debounce_s`` after the last call,
        with ``provider`` (the session's; default: the server's)."""
        if provider is not None:
            self._providers[session_id] = provider
        self._extractions.schedule((team_id, session_id))

    async def _run_quietly(self, key: tuple[str, str]) -> None:
        team_id, session_id = key
        logs.bind(team=team_id, session=session_id, reply=None)
        await self.run(team_id, session_id)

    async def _summarise_quietly(self, team_id: str) -> None:
        logs.bind(team=team_id, session=None, reply=None)
        try:
            await self.refresh_summary(team_id)
        except Exception:
            log.exception("the dashboard summary of team %s failed", team_id)

    async def run(self, team_id: str, session_id: str) -> dict[str, Any]:
        """One extraction pass; returns what changed (empty when nothing did)."""
        try:
            return await self._run(team_id, session_id)
        except Exception:
            log.exception("extraction for session %s failed", session_id)
            return {}

    async def _run(self, team_id: str, session_id: str) -> dict[str, Any]:
        async with self.sessionmaker() as db:
            rows = await summaries.history_after(
                db, session_id=session_id, after_id=self._last_seen.get(session_id), limit=WINDOW
            )
        sources = [Source(m.id, m.role, m.content) for m in rows if m.content]
        if not sources:
            return {}
        provider = self._providers.pop(session_id, self.provider)
        result = await extract(provider, sources, today=dt.date.today())
        self._last_seen[session_id] = sources[-1].id
        self._last_seen.move_to_end(session_id)
        if len(self._last_seen) > LAST_SEEN_LIMIT:
            self._last_seen.popitem(last=False)
        found = result.extraction
        if found.empty:
            return {}
        changed: dict[str, list[Any]] = {"tasks": [], "insights": [], "states": []}
        async with transaction(self.sessionmaker) as db:
            known = [
                KnownTask(t.id, t.version, t.title, t.owner, t.due, t.status)
                for t in await _known_tasks(db, team_id)
            ]
            for change in plan_task_changes(found.tasks, known):
                try:
                    if change.task_id is None:
                        view = await board.create_task(
                            db,
                            team_id=team_id,
                            author_kind=result.author_kind,
                            session_id=session_id,
                            source_message_id=result.source_message_id,
                            **change.fields,
                        )
                    else:
                        view = await board.update_task(
                            db,
                            team_id=team_id,
                            task_id=change.task_id,
                            expected_version=change.expected_version,
                            author_kind=result.author_kind,
                            author_id=None,
                            session_id=session_id,
                            source_message_id=result.source_message_id,
                            **change.fields,
                        )
                except ChathubError as exc:  # e.g. a person changed it meanwhile
                    log.info("extracted task change skipped: %s", exc.detail)
                    continue
                changed["tasks"].append(asdict(view))
            insight_page = await board.list_insights(
                db, team_id=team_id, limit=KNOWN_LIMIT, cursor=None
            )
            for insight in new_insights(found.insights, [i.text for i in insight_page.items]):
                view_i = await board.create_insight(
                    db,
                    team_id=team_id,
                    text=insight.text,
                    kind=insight.kind,
                    author_kind=result.author_kind,
                    session_id=session_id,
                    source_message_id=result.source_message_id,
                )
                changed["insights"].append(asdict(view_i))
            for state in found.states:
                try:
                    before = await board.get_state(db, team_id=team_id, key=state.key)
                except ChathubError:
                    before = None
                view_s = await board.set_state(
                    db,
                    team_id=team_id,
                    key=state.key,
                    value=state.value,
                    author_kind=result.author_kind,
                    updated_by=result.author_kind,
                    session_id=session_id,
                    source_message_id=result.source_message_id,
                )
                if before is None or before.version != view_s.version:
                    changed["states"].append(asdict(view_s))
            version = await board.dashboard_version(db, team_id=team_id)
        changes = {k: v for k, v in changed.items() if v}
        if not changes:
            return {}
        await self.dashboards.publish(team_id, version, changes)
        self._summaries.schedule(team_id)
        return changes

    async def refresh_summary(self, team_id: str) -> None:
        """The model writes the dashboard's summary from what is on it."""
        async with self.sessionmaker() as db:
            view = await board.dashboard(db, team_id=team_id)
        lines = [
            f"Open task: {t.title} (owner {t.owner or '?'}, due {t.due or '?'})"
            for t in view.open_tasks
        ]
        lines += [f"{i.kind.title()}: {i.text}" for i in view.recent_insights]
        lines += [f"State {s.key} = {s.value}" for s in view.states]
        request = CompletionRequest(
            turns=[ChatTurn("user", "\n".join(lines) or "Nothing yet.")],
            system=(
                "Write a short status summary (at most five sentences) of this team "
                "dashboard for the team: what is open, what is at risk, what was decided."
            ),
            temperature=0.2,
            max_tokens=300,
        )
        parts = [
            event.text
            async for event in stream_with_retry(self.provider, request)
            if isinstance(event, TextDelta)
        ]
        text = "".join(parts).strip()
        if not text:
            return
        async with transaction(self.sessionmaker) as db:
            summary = await board.add_summary(db, team_id=team_id, text=text)
            version = await board.dashboard_version(db, team_id=team_id)
        await self.dashboards.publish(team_id, version, {"summary": asdict(summary)})

    @property
    def idle(self) -> bool:
        """Nothing scheduled and nothing running."""
        return self._extractions.idle and self._summaries.idle

    async def close(self) -> None:
        await self._extractions.close()
        await self._summaries.close()
