"""State keys: a versioned JSON value per key."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from chathub.errors import BadRequest, Conflict, NotFound
from chathub.storage.models import StateVersion
from chathub.storage.pagination import Page, paginate
from chathub.storage.repositories.dashboard._validation import _check_author, check_state_key
from chathub.storage.repositories.dashboard._versions import MAX_ATTEMPTS, _insert_version, _stale
from chathub.storage.repositories.dashboard.views import StateView


def _same_json(a: Any, b: Any) -> bool:
    # Via JSON, so that 1 and True (equal in Python) are different values.
    option = orjson.OPT_SORT_KEYS
    return orjson.dumps(a, option=option) == orjson.dumps(b, option=option)


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
) -> tuple[StateView, bool]:
    """Append a version of ``key`` holding ``value`` (any JSON); returns the
    key's current version and whether this call wrote it.

    ``expected_version`` is the version the key must be at (0: the key must
    not exist yet), else PreconditionFailed; None writes unconditionally.
    Setting the value the key already has (also when a concurrent writer
    has just set it) writes nothing.
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
            return _state_view(current), False
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
            return _state_view(row), True
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
