"""The team dashboard: versioned tasks, insights and states, and summaries.

Immutable versions
    Every change to a task, insight or state key is a new row whose ``version``
    is the previous one plus one; version 1 is the creation. This module only
    ever INSERTs into the version tables, never UPDATEs or DELETEs them. The
    current view of a task (insight, state key) is its highest version.

Concurrent writers
    Two writers that start from the same version race for the same unique
    ``(id, version)`` key. The row is written with ``INSERT ... ON CONFLICT DO
    NOTHING``, so the loser writes nothing and the caller's transaction stays
    usable (no failed flush to roll back). The loser then re-reads: with an
    ``expected_version`` it gets :class:`PreconditionFailed` (409, with the
    ``current_version``); without one, its change is re-applied on top of the
    winner's (at most :data:`MAX_ATTEMPTS` times, then :class:`Conflict`).

No-op writes
    A change that leaves every field as it is writes no version and returns
    the current view, so re-extracting the same facts does not grow history.
    ``expected_version`` is still checked first.

Dashboard version
    :func:`dashboard_version` is the number of version rows the team has
    (task, insight and state versions plus summaries). Rows are never deleted
    and every change inserts exactly one, so it rises whenever something on
    the dashboard changes, never falls, and is the same on every replica.

Validation
    Field values are checked here (status, due date, sizes, state keys, author
    kinds) so that every writer, REST or extraction, stores the same shapes;
    a bad value is :class:`BadRequest` and writes nothing. References
    (``session_id``, ``source_message_id``) are the caller's to check.

Every function is scoped by ``team_id``: an id of another team is NotFound.
Functions flush, never commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any, TypeVar

import orjson
from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from chathub.errors import BadRequest, Conflict, NotFound, PreconditionFailed
from chathub.ids import new_id
from chathub.storage.models import (
    Base,
    DashboardSummary,
    InsightVersion,
    StateVersion,
    TaskVersion,
)
from chathub.storage.pagination import Page, paginate

TASK_STATUSES = ("open", "done", "dropped")
AUTHOR_KINDS = ("user", "model", "extractor")
TASK_FIELDS = frozenset({"title", "owner", "due", "status"})
INSIGHT_FIELDS = frozenset({"text", "kind"})
DUE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
STATE_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"
INSIGHT_KIND_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
MAX_TITLE = 500
MAX_OWNER = 200
MAX_INSIGHT_TEXT = 10_000
MAX_SUMMARY_TEXT = 100_000
MAX_ATTEMPTS = 5

# On the dashboard itself; the full lists are paginated elsewhere.
DASHBOARD_OPEN_TASKS = 50
DASHBOARD_RECENT_INSIGHTS = 10
DASHBOARD_STATES = 100

_KEEP: Any = object()
VersionRow = TypeVar("VersionRow", bound=Base)


# --- views ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskView:
    """A task as of one version. ``created_at`` is when version 1 was written,
    ``updated_at`` when this version was."""

    id: str
    version: int
    title: str
    owner: str | None
    due: str | None
    status: str
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class InsightView:
    """An insight as of one version (timestamps as for :class:`TaskView`)."""

    id: str
    version: int
    text: str
    kind: str
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StateView:
    """A state key's value as of one version."""

    key: str
    value: Any
    version: int
    updated_by: str | None
    author_kind: str
    session_id: str | None
    source_message_id: str | None
    updated_at: datetime


@dataclass(frozen=True)
class TaskCounts:
    open: int
    done: int
    dropped: int


@dataclass(frozen=True)
class OwnerLoad:
    owner: str | None
    open: int


@dataclass(frozen=True)
class Counts:
    tasks: TaskCounts
    insights: int
    states: int


@dataclass(frozen=True)
class SummaryView:
    version: int
    text: str
    created_at: datetime


@dataclass(frozen=True)
class DashboardView:
    """What ``GET /dashboard`` shows, in the shape of its JSON body
    (:meth:`as_dict`). ``version`` was read before the rest, so the content
    is at least as new as the version it carries."""

    version: int
    counts: Counts
    open_tasks: list[TaskView]
    open_tasks_by_owner: list[OwnerLoad]
    recent_insights: list[InsightView]
    states: list[StateView]
    summary: SummaryView | None

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and datetimes (for orjson), as REST sends it."""
        return asdict(self)


# --- validation ----------------------------------------------------------


def check_due(due: str | None) -> str | None:
    """``due`` as a calendar date ``YYYY-MM-DD`` (or None); BadRequest else."""
    if due is None:
        return None
    if not isinstance(due, str) or not re.fullmatch(DUE_PATTERN, due):
        raise BadRequest("due must be a date as YYYY-MM-DD")
    try:
        date.fromisoformat(due)
    except ValueError as exc:
        raise BadRequest(f"due is not a real date: {due}") from exc
    return due


def _check_text(name: str, value: Any, *, max_length: int, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    text = value.strip()
    if not text:
        raise BadRequest(f"{name} must not be empty")
    if len(text) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    return text


def _check_status(status: Any) -> str:
    if status not in TASK_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(TASK_STATUSES)}")
    return str(status)


def _check_author(author_kind: str) -> None:
    if author_kind not in AUTHOR_KINDS:
        raise BadRequest(f"author_kind must be one of {', '.join(AUTHOR_KINDS)}")


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not re.fullmatch(INSIGHT_KIND_PATTERN, kind):
        raise BadRequest("kind must be lowercase letters, digits, '_' or '-' (at most 32)")
    return kind


def check_state_key(key: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(STATE_KEY_PATTERN, key):
        raise BadRequest("state key must be 1-200 of A-Z a-z 0-9 _ . : - (not starting with one)")
    return key


def _task_fields(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changes) - TASK_FIELDS
    if unknown:
        raise BadRequest(f"unknown task fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "title":
            checked[name] = _check_text("title", value, max_length=MAX_TITLE)
        elif name == "owner":
            checked[name] = _check_text("owner", value, max_length=MAX_OWNER, optional=True)
        elif name == "due":
            checked[name] = check_due(value)
        else:
            checked[name] = _check_status(value)
    return checked


def _insight_fields(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changes) - INSIGHT_FIELDS
    if unknown:
        raise BadRequest(f"unknown insight fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "text":
            checked[name] = _check_text("text", value, max_length=MAX_INSIGHT_TEXT)
        else:
            checked[name] = _check_kind(value)
    return checked


def _same_json(a: Any, b: Any) -> bool:
    # Via JSON, so that 1 and True (equal in Python) are different values.
    option = orjson.OPT_SORT_KEYS
    return orjson.dumps(a, option=option) == orjson.dumps(b, option=option)


# --- writing one version -------------------------------------------------


async def _insert_version(
    db: AsyncSession, model: type[VersionRow], values: dict[str, Any], unique: tuple[str, ...]
) -> VersionRow | None:
    """Insert one version row; None, having written nothing, when another
    writer already holds its ``unique`` key."""
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        pg = pg_insert(model).values(**values).on_conflict_do_nothing(index_elements=unique)
        return await db.scalar(pg.returning(model))
    if dialect == "sqlite":
        lite = sqlite_insert(model).values(**values).on_conflict_do_nothing(index_elements=unique)
        return await db.scalar(lite.returning(model))
    row = model(**values)
    try:
        async with db.begin_nested():
            db.add(row)
            await db.flush()
    except IntegrityError:
        return None
    return row


def _stale(what: str, current: int, expected: int) -> PreconditionFailed:
    return PreconditionFailed(
        f"{what} is at version {current}, not {expected}", current_version=current
    )


# --- tasks ---------------------------------------------------------------


def _current_tasks(team_id: str) -> Select[TaskVersion]:
    newer = aliased(TaskVersion)
    return select(TaskVersion).where(
        TaskVersion.team_id == team_id,
        ~select(newer.row_id)
        .where(newer.task_id == TaskVersion.task_id, newer.version > TaskVersion.version)
        .exists(),
    )


async def _task_views(db: AsyncSession, rows: Iterable[TaskVersion]) -> list[TaskView]:
    rows = list(rows)
    later = {r.task_id for r in rows if r.version > 1}
    created: dict[str, datetime] = {}
    if later:
        found = await db.execute(
            select(TaskVersion.task_id, TaskVersion.created_at).where(
                TaskVersion.task_id.in_(later), TaskVersion.version == 1
            )
        )
        created = {task_id: at for task_id, at in found}
    return [
        TaskView(
            id=r.task_id,
            version=r.version,
            title=r.title,
            owner=r.owner,
            due=r.due,
            status=r.status,
            session_id=r.session_id,
            source_message_id=r.source_message_id,
            author_kind=r.author_kind,
            author_id=r.author_id,
            created_at=created.get(r.task_id, r.created_at),
            updated_at=r.created_at,
        )
        for r in rows
    ]


async def _task_view(db: AsyncSession, row: TaskVersion) -> TaskView:
    return (await _task_views(db, [row]))[0]


async def _current_task_row(db: AsyncSession, *, team_id: str, task_id: str) -> TaskVersion:
    row = await db.scalar(
        select(TaskVersion)
        .where(TaskVersion.team_id == team_id, TaskVersion.task_id == task_id)
        .order_by(TaskVersion.version.desc())
        .limit(1)
    )
    if row is None:
        raise NotFound("task not found")
    return row


async def create_task(
    db: AsyncSession,
    *,
    team_id: str,
    title: str,
    author_kind: str,
    owner: str | None = None,
    due: str | None = None,
    status: str = "open",
    session_id: str | None = None,
    source_message_id: str | None = None,
    author_id: str | None = None,
) -> TaskView:
    """A new task at version 1."""
    _check_author(author_kind)
    fields = _task_fields({"title": title, "owner": owner, "due": due, "status": status})
    row = TaskVersion(
        task_id=new_id(),
        team_id=team_id,
        version=1,
        session_id=session_id,
        source_message_id=source_message_id,
        author_kind=author_kind,
        author_id=author_id,
        **fields,
    )
    db.add(row)
    await db.flush()
    return await _task_view(db, row)


async def get_task(db: AsyncSession, *, team_id: str, task_id: str) -> TaskView:
    """The current view (highest version) of a task of this team."""
    return await _task_view(db, await _current_task_row(db, team_id=team_id, task_id=task_id))


async def update_task(
    db: AsyncSession,
    *,
    team_id: str,
    task_id: str,
    expected_version: int | None,
    author_kind: str,
    author_id: str | None,
    session_id: str | None = _KEEP,
    source_message_id: str | None = _KEEP,
    **changes: Any,
) -> TaskView:
    """Append a version with ``changes`` (any of title, owner, due, status)
    applied to the current one, and return it.

    With ``expected_version``, the task must be at exactly that version, else
    PreconditionFailed. ``session_id``/``source_message_id`` record where
    this version came from; left out, they carry over from the current one.
    A change that alters nothing writes nothing and returns the current view.
    """
    _check_author(author_kind)
    fields = _task_fields(changes)
    if session_id is not _KEEP:
        fields["session_id"] = session_id
    if source_message_id is not _KEEP:
        fields["source_message_id"] = source_message_id
    for _ in range(MAX_ATTEMPTS):
        current = await _current_task_row(db, team_id=team_id, task_id=task_id)
        if expected_version is not None and current.version != expected_version:
            raise _stale("task", current.version, expected_version)
        if all(getattr(current, name) == value for name, value in fields.items()):
            return await _task_view(db, current)
        values = {
            "title": current.title,
            "owner": current.owner,
            "due": current.due,
            "status": current.status,
            "session_id": current.session_id,
            "source_message_id": current.source_message_id,
            **fields,
            "task_id": task_id,
            "team_id": team_id,
            "version": current.version + 1,
            "author_kind": author_kind,
            "author_id": author_id,
        }
        row = await _insert_version(db, TaskVersion, values, ("task_id", "version"))
        if row is not None:
            return await _task_view(db, row)
        # Lost a race: the next read sees the winner (and with an
        # expected_version, answers PreconditionFailed).
    raise Conflict("task is changing too fast; try again")


async def list_tasks(
    db: AsyncSession,
    *,
    team_id: str,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    owner: str | None = None,
    session_id: str | None = None,
) -> Page[TaskView]:
    """Current views, newest task first (by task id, which never changes, so
    a task updated between pages is neither repeated nor skipped). Filters
    apply to the current view."""
    stmt = _current_tasks(team_id)
    if status is not None:
        stmt = stmt.where(TaskVersion.status == status)
    if owner is not None:
        stmt = stmt.where(TaskVersion.owner == owner)
    if session_id is not None:
        stmt = stmt.where(TaskVersion.session_id == session_id)
    page = await paginate(db, stmt, TaskVersion.task_id, limit=limit, cursor=cursor)
    return Page(items=await _task_views(db, page.items), next_cursor=page.next_cursor)


async def task_history(
    db: AsyncSession, *, team_id: str, task_id: str, limit: int, cursor: str | None
) -> Page[TaskView]:
    """Every version of a task, oldest first."""
    await _current_task_row(db, team_id=team_id, task_id=task_id)
    stmt = select(TaskVersion).where(TaskVersion.team_id == team_id, TaskVersion.task_id == task_id)
    page = await paginate(
        db, stmt, TaskVersion.version, limit=limit, cursor=cursor, descending=False
    )
    return Page(items=await _task_views(db, page.items), next_cursor=page.next_cursor)


# --- insights ------------------------------------------------------------


def _current_insights(team_id: str) -> Select[InsightVersion]:
    newer = aliased(InsightVersion)
    return select(InsightVersion).where(
        InsightVersion.team_id == team_id,
        ~select(newer.row_id)
        .where(
            newer.insight_id == InsightVersion.insight_id,
            newer.version > InsightVersion.version,
        )
        .exists(),
    )


async def _insight_views(db: AsyncSession, rows: Iterable[InsightVersion]) -> list[InsightView]:
    rows = list(rows)
    later = {r.insight_id for r in rows if r.version > 1}
    created: dict[str, datetime] = {}
    if later:
        found = await db.execute(
            select(InsightVersion.insight_id, InsightVersion.created_at).where(
                InsightVersion.insight_id.in_(later), InsightVersion.version == 1
            )
        )
        created = {insight_id: at for insight_id, at in found}
    return [
        InsightView(
            id=r.insight_id,
            version=r.version,
            text=r.text,
            kind=r.kind,
            session_id=r.session_id,
            source_message_id=r.source_message_id,
            author_kind=r.author_kind,
            author_id=r.author_id,
            created_at=created.get(r.insight_id, r.created_at),
            updated_at=r.created_at,
        )
        for r in rows
    ]


async def _current_insight_row(
    db: AsyncSession, *, team_id: str, insight_id: str
) -> InsightVersion:
    row = await db.scalar(
        select(InsightVersion)
        .where(InsightVersion.team_id == team_id, InsightVersion.insight_id == insight_id)
        .order_by(InsightVersion.version.desc())
        .limit(1)
    )
    if row is None:
        raise NotFound("insight not found")
    return row


async def create_insight(
    db: AsyncSession,
    *,
    team_id: str,
    text: str,
    author_kind: str,
    kind: str = "note",
    session_id: str | None = None,
    source_message_id: str | None = None,
    author_id: str | None = None,
) -> InsightView:
    """A new insight at version 1."""
    _check_author(author_kind)
    fields = _insight_fields({"text": text, "kind": kind})
    row = InsightVersion(
        insight_id=new_id(),
        team_id=team_id,
        version=1,
        session_id=session_id,
        source_message_id=source_message_id,
        author_kind=author_kind,
        author_id=author_id,
        **fields,
    )
    db.add(row)
    await db.flush()
    return (await _insight_views(db, [row]))[0]


async def get_insight(db: AsyncSession, *, team_id: str, insight_id: str) -> InsightView:
    row = await _current_insight_row(db, team_id=team_id, insight_id=insight_id)
    return (await _insight_views(db, [row]))[0]


async def update_insight(
    db: AsyncSession,
    *,
    team_id: str,
    insight_id: str,
    expected_version: int | None,
    author_kind: str,
    author_id: str | None,
    session_id: str | None = _KEEP,
    source_message_id: str | None = _KEEP,
    **changes: Any,
) -> InsightView:
    """Append a version with ``changes`` (text, kind); the same rules as
    :func:`update_task`."""
    _check_author(author_kind)
    fields = _insight_fields(changes)
    if session_id is not _KEEP:
        fields["session_id"] = session_id
    if source_message_id is not _KEEP:
        fields["source_message_id"] = source_message_id
    for _ in range(MAX_ATTEMPTS):
        current = await _current_insight_row(db, team_id=team_id, insight_id=insight_id)
        if expected_version is not None and current.version != expected_version:
            raise _stale("insight", current.version, expected_version)
        if all(getattr(current, name) == value for name, value in fields.items()):
            return (await _insight_views(db, [current]))[0]
        values = {
            "text": current.text,
            "kind": current.kind,
            "session_id": current.session_id,
            "source_message_id": current.source_message_id,
            **fields,
            "insight_id": insight_id,
            "team_id": team_id,
            "version": current.version + 1,
            "author_kind": author_kind,
            "author_id": author_id,
        }
        row = await _insert_version(db, InsightVersion, values, ("insight_id", "version"))
        if row is not None:
            return (await _insight_views(db, [row]))[0]
    raise Conflict("insight is changing too fast; try again")


async def list_insights(
    db: AsyncSession,
    *,
    team_id: str,
    limit: int,
    cursor: str | None,
    kind: str | None = None,
    session_id: str | None = None,
) -> Page[InsightView]:
    """Current views, newest insight first (by insight id, as for tasks)."""
    stmt = _current_insights(team_id)
    if kind is not None:
        stmt = stmt.where(InsightVersion.kind == kind)
    if session_id is not None:
        stmt = stmt.where(InsightVersion.session_id == session_id)
    page = await paginate(db, stmt, InsightVersion.insight_id, limit=limit, cursor=cursor)
    return Page(items=await _insight_views(db, page.items), next_cursor=page.next_cursor)


async def insight_history(
    db: AsyncSession, *, team_id: str, insight_id: str, limit: int, cursor: str | None
) -> Page[InsightView]:
    """Every version of an insight, oldest first."""
    await _current_insight_row(db, team_id=team_id, insight_id=insight_id)
    stmt = select(InsightVersion).where(
        InsightVersion.team_id == team_id, InsightVersion.insight_id == insight_id
    )
    page = await paginate(
        db, stmt, InsightVersion.version, limit=limit, cursor=cursor, descending=False
    )
    return Page(items=await _insight_views(db, page.items), next_cursor=page.next_cursor)


# --- states --------------------------------------------------------------


def _state_view(row: StateVersion) -> StateView:
    return StateView(
        key=row.key,
        value=row.value,
        version=row.version,
        updated_by=row.updated_by,
        author_kind=row.author_kind,
        session_id=row.session_id,
        source_message_id=row.source_message_id,
        updated_at=row.created_at,
    )


def _current_states_stmt(team_id: str) -> Select[StateVersion]:
    newer = aliased(StateVersion)
    return select(StateVersion).where(
        StateVersion.team_id == team_id,
        ~select(newer.row_id)
        .where(
            newer.team_id == StateVersion.team_id,
            newer.key == StateVersion.key,
            newer.version > StateVersion.version,
        )
        .exists(),
    )


async def _current_state_row(db: AsyncSession, *, team_id: str, key: str) -> StateVersion | None:
    return await db.scalar(
        select(StateVersion)
        .where(StateVersion.team_id == team_id, StateVersion.key == key)
        .order_by(StateVersion.version.desc())
        .limit(1)
    )


async def get_state(db: AsyncSession, *, team_id: str, key: str) -> StateView:
    row = await _current_state_row(db, team_id=team_id, key=key)
    if row is None:
        raise NotFound("state key not found")
    return _state_view(row)


async def set_state(
    db: AsyncSession,
    *,
    team_id: str,
    key: str,
    value: Any,
    author_kind: str,
    updated_by: str | None,
    session_id: str | None = None,
    source_message_id: str | None = None,
    expected_version: int | None = None,
) -> StateView:
    """Append a version of ``key`` holding ``value`` (any JSON) and return it.

    ``expected_version`` is the version the key must be at (0: the key must
    not exist yet), else PreconditionFailed; None writes unconditionally.
    Setting the value the key already has writes nothing.
    """
    _check_author(author_kind)
    check_state_key(key)
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise BadRequest("state value must be JSON") from exc
    for _ in range(MAX_ATTEMPTS):
        current = await _current_state_row(db, team_id=team_id, key=key)
        have = current.version if current is not None else 0
        if expected_version is not None and have != expected_version:
            raise _stale(f"state {key!r}", have, expected_version)
        if current is not None and _same_json(current.value, value):
            return _state_view(current)
        values = {
            "team_id": team_id,
            "key": key,
            "version": have + 1,
            "value": value,
            "session_id": session_id,
            "source_message_id": source_message_id,
            "author_kind": author_kind,
            "updated_by": updated_by,
        }
        row = await _insert_version(db, StateVersion, values, ("team_id", "key", "version"))
        if row is not None:
            return _state_view(row)
    raise Conflict(f"state {key!r} is changing too fast; try again")


async def current_states(
    db: AsyncSession, *, team_id: str, limit: int, cursor: str | None
) -> Page[StateView]:
    """The current version of each key, by key."""
    page = await paginate(
        db,
        _current_states_stmt(team_id),
        StateVersion.key,
        limit=limit,
        cursor=cursor,
        descending=False,
    )
    return Page(items=[_state_view(r) for r in page.items], next_cursor=page.next_cursor)


async def state_history(
    db: AsyncSession, *, team_id: str, key: str, limit: int, cursor: str | None
) -> Page[StateView]:
    """Every version of ``key``, oldest first; NotFound for a key never set."""
    if await _current_state_row(db, team_id=team_id, key=key) is None:
        raise NotFound("state key not found")
    stmt = select(StateVersion).where(StateVersion.team_id == team_id, StateVersion.key == key)
    page = await paginate(
        db, stmt, StateVersion.version, limit=limit, cursor=cursor, descending=False
    )
    return Page(items=[_state_view(r) for r in page.items], next_cursor=page.next_cursor)


# --- summaries -----------------------------------------------------------


def _summary_view(row: DashboardSummary) -> SummaryView:
    return SummaryView(version=row.version, text=row.text, created_at=row.created_at)


async def _latest_summary_row(db: AsyncSession, *, team_id: str) -> DashboardSummary | None:
    return await db.scalar(
        select(DashboardSummary)
        .where(DashboardSummary.team_id == team_id)
        .order_by(DashboardSummary.version.desc())
        .limit(1)
    )


async def latest_summary(db: AsyncSession, *, team_id: str) -> SummaryView | None:
    row = await _latest_summary_row(db, team_id=team_id)
    return _summary_view(row) if row is not None else None


async def add_summary(db: AsyncSession, *, team_id: str, text: str) -> SummaryView:
    """Append the next summary version; the same text as the latest writes nothing."""
    checked = _check_text("summary", text, max_length=MAX_SUMMARY_TEXT)
    for _ in range(MAX_ATTEMPTS):
        latest = await _latest_summary_row(db, team_id=team_id)
        if latest is not None and latest.text == checked:
            return _summary_view(latest)
        values = {
            "team_id": team_id,
            "version": (latest.version if latest is not None else 0) + 1,
            "text": checked,
        }
        row = await _insert_version(db, DashboardSummary, values, ("team_id", "version"))
        if row is not None:
            return _summary_view(row)
    raise Conflict("summary is changing too fast; try again")


# --- the dashboard -------------------------------------------------------


async def dashboard_version(db: AsyncSession, *, team_id: str) -> int:
    """The team's dashboard version: how many version rows it has. It rises
    with every change and never falls (see the module docstring)."""
    counts = [
        select(func.count()).select_from(model).where(model.team_id == team_id).scalar_subquery()
        for model in (TaskVersion, InsightVersion, StateVersion, DashboardSummary)
    ]
    total = await db.scalar(select(counts[0] + counts[1] + counts[2] + counts[3]))
    return int(total or 0)


async def dashboard(db: AsyncSession, *, team_id: str) -> DashboardView:
    """The team's dashboard: counts, open tasks (soonest due first, undated
    last), open tasks per owner, recent insights, current states, summary."""
    version = await dashboard_version(db, team_id=team_id)

    current = _current_tasks(team_id)
    statuses = await db.execute(
        current.with_only_columns(TaskVersion.status, func.count()).group_by(TaskVersion.status)
    )
    by_status = {status: n for status, n in statuses}
    open_rows = await db.scalars(
        current.where(TaskVersion.status == "open")
        .order_by(TaskVersion.due.is_(None), TaskVersion.due, TaskVersion.task_id)
        .limit(DASHBOARD_OPEN_TASKS)
    )
    loads = (
        await db.execute(
            current.where(TaskVersion.status == "open")
            .with_only_columns(TaskVersion.owner, func.count())
            .group_by(TaskVersion.owner)
        )
    ).all()
    by_owner = sorted(
        (OwnerLoad(owner=owner, open=n) for owner, n in loads),
        key=lambda load: (-load.open, load.owner is None, load.owner or ""),
    )

    insights = _current_insights(team_id)
    insight_count = await db.scalar(insights.with_only_columns(func.count()))
    recent = await db.scalars(
        insights.order_by(InsightVersion.insight_id.desc()).limit(DASHBOARD_RECENT_INSIGHTS)
    )

    states = _current_states_stmt(team_id)
    state_count = await db.scalar(states.with_only_columns(func.count()))
    state_rows = await db.scalars(states.order_by(StateVersion.key).limit(DASHBOARD_STATES))

    return DashboardView(
        version=version,
        counts=Counts(
            tasks=TaskCounts(
                open=by_status.get("open", 0),
                done=by_status.get("done", 0),
                dropped=by_status.get("dropped", 0),
            ),
            insights=int(insight_count or 0),
            states=int(state_count or 0),
        ),
        open_tasks=await _task_views(db, open_rows),
        open_tasks_by_owner=by_owner,
        recent_insights=await _insight_views(db, recent),
        states=[_state_view(r) for r in state_rows],
        summary=await latest_summary(db, team_id=team_id),
    )
