"""Running extraction after replies and keeping the dashboard current.

After a reply completes, extraction for its session is scheduled, debounced:
a burst of replies gives one run. A run extracts from every message since the
last run, oldest first, in batches of :data:`WINDOW` (one model call each),
skipping the messages of turns in a mode with extraction off; it writes what
is new or changed as new versions (author ``model`` or ``extractor``), and
publishes ``dashboard.updated``. After a run that changed something, the
model rewrites the team's dashboard summary (versioned), which is published
too; debounced per team as well, so a burst of runs gives one.

Guarantees of a batch
    Its writes and the move of the session's read position
    (``chat_sessions.extracted_until``, kept in the database so that every
    instance and a restart go on where the last run stopped) are one
    transaction: a batch that fails is read again by the next run, and of
    two instances that read the same batch only one writes it. An item
    storage refuses is skipped (and logged), the others are written. Nothing
    is written for a session deleted meanwhile, or read for a session that is
    not the team's.

Background work
    Extraction and the summary ask the model as background work
    (``CompletionRequest.background``): on the embedded model a user's reply
    goes first and stops them (:class:`ProviderPreempted`). A stopped batch
    is not written and its messages stay unread; the run stops there and is
    scheduled again, like a stopped summary.

Guardrails
    What the model extracts passes the output guardrail before it is
    written, as a reply does: each item through the policy of the mode of
    the message it comes from (redacted; an item the policy blocks is
    dropped), the team's summary through the default policy.

Sources
    Each item is linked to the message it comes from (see
    ``chathub.llm.extraction``): the deterministic extractor knows it; the
    model is shown numbered messages and names one per item, and an item
    without a usable number is linked to the batch's first user message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub import logs
from chathub.errors import ChathubError
from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    LLMProvider,
    ProviderPreempted,
    TextDelta,
)
from chathub.llm.extraction import (
    Extraction,
    ExtractionResult,
    KnownTask,
    Source,
    extract,
    latest_states,
    new_insights,
    plan_task_changes,
)
from chathub.llm.guardrails import Policy, redact_all
from chathub.llm.modes import Mode, mode_policy
from chathub.llm.retry import stream_with_retry
from chathub.server import metrics
from chathub.server.dashboards import Dashboards
from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as board
from chathub.storage.repositories import modes as modes_repo
from chathub.storage.repositories import summaries

log = logging.getLogger("chathub.extraction")

WINDOW = 12
"""Messages per batch: what one model call reads."""
MAX_BATCHES = 10
"""Batches per run; a session further behind goes on in another run."""
KNOWN_LIMIT = 100
"""Newest tasks and insights a run compares what it found with (besides
every open task, up to :data:`OPEN_LIMIT`)."""
OPEN_LIMIT = 1000


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


class _Superseded(Exception):
    """Another run read the batch first, or its session was deleted."""


@dataclass(frozen=True)
class _Batch:
    after: str | None
    """Where the session's extraction stood when this was read."""
    sources: list[Source]
    """The messages to extract from: those of turns whose mode extracts."""
    until: str
    """The last message read, extracted or not."""
    policies: Mapping[str, Policy] = dataclasses.field(default_factory=dict)
    """Per source message, the guardrail policy of its mode, which what is
    extracted from it passes."""


async def _extracting_modes(
    db: AsyncSession, team_id: str, names: set[str | None]
) -> dict[str | None, Mode | None]:
    """Of the modes ``names``, those with extraction on now. A mode no longer
    known counts as off: nothing says its messages may be extracted. A
    message stored before modes were recorded (None) is extracted, under the
    default guardrail policy."""
    on: dict[str | None, Mode | None] = {}
    for name in names:
        if name is None:
            on[None] = None
            continue
        mode = await modes_repo.resolve_mode(db, team_id=team_id, name=name)
        if mode is not None and mode.extraction:
            on[name] = mode
    return on


def _guarded_output(text: str, policy: Policy) -> str | None:
    """Model output that the dashboard keeps passes the output guardrail as a
    reply does: redacted, or None where the policy blocks it."""
    filtered = redact_all(text, policy)
    for action, rule in filtered.actions:
        metrics.GUARDRAIL_ACTIONS.labels(action=action, rule=rule).inc()
    return None if filtered.blocked else filtered.text


def _screened(result: ExtractionResult, policies: Mapping[str, Policy]) -> ExtractionResult:
    """``result`` with every text it would write through the guardrail policy
    of the message it comes from: redacted, and an item the policy blocks
    dropped. A state whose key would change is dropped too: a key is a name,
    not text to redact."""
    default = Policy.default()

    def screen(text: str, message: int | None) -> str | None:
        return _guarded_output(text, policies.get(result.source_of(message) or "", default))

    found = result.extraction
    tasks = []
    for task in found.tasks:
        title = screen(task.title, task.message)
        owner = screen(task.owner, task.message) if task.owner is not None else None
        if title is not None and (owner is not None or task.owner is None):
            tasks.append(task.model_copy(update={"title": title, "owner": owner}))
    insights = []
    for insight in found.insights:
        if (text := screen(insight.text, insight.message)) is not None:
            insights.append(insight.model_copy(update={"text": text}))
    states = []
    for state in found.states:
        if screen(state.key, state.message) != state.key:
            continue
        value: str | int | float | bool | None = state.value
        if isinstance(state.value, str):
            value = screen(state.value, state.message)
        if value is not None:
            states.append(state.model_copy(update={"value": value}))
    extraction = Extraction(tasks=tasks, insights=insights, states=states)
    return dataclasses.replace(result, extraction=extraction)


_Out = TypeVar("_Out")


async def _guarded(db: AsyncSession, what: str, write: Awaitable[_Out]) -> _Out | None:
    """``write``, in a savepoint; None when storage refuses it, which undoes
    it alone and leaves the transaction usable for the other items."""
    try:
        async with db.begin_nested():
            return await write
    except ChathubError as exc:  # e.g. a person changed it meanwhile, or a bad value
        log.info("extracted %s skipped: %s", what, exc.detail)
        return None


async def _write(
    db: AsyncSession, team_id: str, session_id: str, result: ExtractionResult
) -> dict[str, list[Any]]:
    """Write one extraction's new and changed items; returns their views."""
    found = result.extraction
    changed: dict[str, list[Any]] = {"tasks": [], "insights": [], "states": []}
    known = [
        KnownTask(t.id, t.version, t.title, t.owner, t.due, t.status)
        for t in (await _known_tasks(db, team_id) if found.tasks else [])
    ]
    # Pure CPU over up to ~1100 known tasks: off the event loop.
    for change in await asyncio.to_thread(plan_task_changes, found.tasks, known):
        source = result.source_of(change.message)
        if change.task_id is None:
            write: Awaitable[board.TaskView] = board.create_task(
                db,
                team_id=team_id,
                author_kind=result.author_kind,
                session_id=session_id,
                source_message_id=source,
                **change.fields,
            )
        else:
            write = board.update_task(
                db,
                team_id=team_id,
                task_id=change.task_id,
                expected_version=change.expected_version,
                author_kind=result.author_kind,
                author_id=None,
                session_id=session_id,
                source_message_id=source,
                **change.fields,
            )
        if (task := await _guarded(db, "task change", write)) is not None:
            changed["tasks"].append(asdict(task))
    insight_page = await board.list_insights(db, team_id=team_id, limit=KNOWN_LIMIT, cursor=None)
    known_texts = [i.text for i in insight_page.items]
    for found_insight in await asyncio.to_thread(new_insights, found.insights, known_texts):
        create = board.create_insight(
            db,
            team_id=team_id,
            text=found_insight.text,
            kind=found_insight.kind,
            author_kind=result.author_kind,
            session_id=session_id,
            source_message_id=result.source_of(found_insight.message),
        )
        if (insight := await _guarded(db, "insight", create)) is not None:
            changed["insights"].append(asdict(insight))
    for found_state in latest_states(found.states):
        set_state = board.set_state(
            db,
            team_id=team_id,
            key=found_state.key,
            value=found_state.value,
            author_kind=result.author_kind,
            updated_by=result.author_kind,
            session_id=session_id,
            source_message_id=result.source_of(found_state.message),
        )
        if (written := await _guarded(db, "state", set_state)) is not None:
            state, changed_it = written
            if changed_it:
                changed["states"].append(asdict(state))
    return changed


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
        except ProviderPreempted:
            log.info("the dashboard summary of team %s gave way to a reply; later", team_id)
            self._summaries.schedule(team_id)
        except Exception:
            log.exception("the dashboard summary of team %s failed", team_id)

    async def run(self, team_id: str, session_id: str) -> dict[str, Any]:
        """One extraction run; returns what changed (empty when nothing did)."""
        try:
            return await self._run(team_id, session_id)
        except Exception:
            log.exception("extraction for session %s failed", session_id)
            return {}

    async def _run(self, team_id: str, session_id: str) -> dict[str, Any]:
        provider = self._providers.pop(session_id, self.provider)
        changes: dict[str, list[Any]] = {}
        for _ in range(MAX_BATCHES):
            batch = await self._next_batch(team_id, session_id)
            if batch is None:
                break
            try:
                found = await self._extract(team_id, session_id, provider, batch)
            except ProviderPreempted:
                # A reply took the model: the batch stays unread, for another run.
                log.info("extraction of session %s gave way to a reply; later", session_id)
                self._providers.setdefault(session_id, provider)
                self._extractions.schedule((team_id, session_id))
                break
            for kind, items in found.items():
                changes.setdefault(kind, []).extend(items)
        else:  # more may be waiting: go on in another run, not this one
            self._providers.setdefault(session_id, provider)
            self._extractions.schedule((team_id, session_id))
        if changes:
            self._summaries.schedule(team_id)
        return changes

    async def _next_batch(self, team_id: str, session_id: str) -> _Batch | None:
        """The oldest unread messages of the session, or None when there is
        none (or the session is deleted, or not the team's)."""
        async with self.sessionmaker() as db:
            after, rows = await summaries.extraction_batch(
                db, team_id=team_id, session_id=session_id, limit=WINDOW
            )
            if not rows:
                return None
            extracting = await _extracting_modes(db, team_id, {m.mode for m in rows})
        read = [m for m in rows if m.content and m.mode in extracting]
        policies = {}
        for m in read:
            mode = extracting[m.mode]
            policies[m.id] = Policy.default() if mode is None else mode_policy(mode)
        sources = [Source(m.id, m.role, m.content) for m in read]
        return _Batch(after=after, sources=sources, until=rows[-1].id, policies=policies)

    async def _extract(
        self, team_id: str, session_id: str, provider: LLMProvider, batch: _Batch
    ) -> dict[str, list[Any]]:
        """Extract from one batch and write what it found, and that its
        messages are read, in one transaction."""
        result = None
        if batch.sources:
            found = await extract(provider, batch.sources, today=dt.date.today())
            result = _screened(found, batch.policies)
        try:
            async with transaction(self.sessionmaker) as db:
                changed: dict[str, list[Any]] = {}
                if result is not None and not result.extraction.empty:
                    changed = await _write(db, team_id, session_id, result)
                read = await summaries.mark_extracted(
                    db,
                    team_id=team_id,
                    session_id=session_id,
                    after_id=batch.after,
                    until=batch.until,
                )
                if not read:
                    raise _Superseded
                changes = {k: v for k, v in changed.items() if v}
                if changes:
                    version = await board.dashboard_version(db, team_id=team_id)
                    # Published under the team's lock: in version order.
                    await self.dashboards.publish(team_id, version, changes)
        except _Superseded:  # rolled back: nothing of this batch is written
            log.info("extraction of session %s superseded", session_id)
            return {}
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
            background=True,
        )
        parts = [
            event.text
            async for event in stream_with_retry(self.provider, request)
            if isinstance(event, TextDelta)
        ]
        # The team's dashboard is in no mode: its summary passes the default
        # policy (the shipped modes').
        text = _guarded_output("".join(parts).strip(), Policy.default())
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
