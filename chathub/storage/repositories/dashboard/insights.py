"""Insights: versioned notes of some kind."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from chathub.errors import Conflict, NotFound
from chathub.storage.models import InsightVersion
from chathub.storage.pagination import Page, paginate
from chathub.storage.repositories.dashboard._validation import _check_author, _insight_fields
from chathub.storage.repositories.dashboard._versions import (
    _KEEP,
    MAX_ATTEMPTS,
    _insert_first_version,
    _insert_version,
    _stale,
)
from chathub.storage.repositories.dashboard.views import InsightView


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
    row = await _insert_first_version(
        db,
        InsightVersion,
        "insight_id",
        _insight_fields({"text": text, "kind": kind}),
        team_id=team_id,
        session_id=session_id,
        source_message_id=source_message_id,
        author_kind=author_kind,
        author_id=author_id,
    )
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
