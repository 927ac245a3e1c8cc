"""Tasks: versioned title, owner, due date and status."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from chathub.errors import Conflict, NotFound
from chathub.storage.models import TaskVersion
from chathub.storage.pagination import Page, paginate
from chathub.storage.repositories.dashboard._validation import _check_author, _task_fields
from chathub.storage.repositories.dashboard._versions import (
    _KEEP,
    MAX_ATTEMPTS,
    _insert_first_version,
    _insert_version,
    _stale,
)
from chathub.storage.repositories.dashboard.views import TaskView


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
    row = await _insert_first_version(
        db,
        TaskVersion,
        "task_id",
        _task_fields({"title": title, "owner": owner, "due": due, "status": status}),
        team_id=team_id,
        session_id=session_id,
        source_message_id=source_message_id,
        author_kind=author_kind,
        author_id=author_id,
    )
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
