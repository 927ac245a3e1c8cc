"""Writing one immutable version row: the insert that loses a race quietly
(``ON CONFLICT DO NOTHING``), the stale-version error, and the retry bound.

On PostgreSQL a writer first takes its team's dashboard lock (a transaction
advisory lock, held until it commits), so that the writers of one team
commit one after the other and each counts the rows of those before it: the
dashboard versions they announce differ and rise in commit order. SQLite
has one writer at a time already."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.errors import Conflict, PreconditionFailed
from chathub.ids import new_id
from chathub.storage.locks import advisory_xact_lock
from chathub.storage.models import Base

MAX_ATTEMPTS = 5

_KEEP: Any = object()
VersionRow = TypeVar("VersionRow", bound=Base)


async def _insert_version(
    db: AsyncSession, model: type[VersionRow], values: dict[str, Any], unique: tuple[str, ...]
) -> VersionRow | None:
    """Insert one version row; None, having written nothing, when another
    writer already holds its ``unique`` key."""
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        await advisory_xact_lock(db, f"chathub:dashboard:{values['team_id']}")
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


async def _insert_first_version(
    db: AsyncSession,
    model: type[VersionRow],
    id_key: str,
    fields: dict[str, Any],
    *,
    team_id: str,
    session_id: str | None,
    source_message_id: str | None,
    author_kind: str,
    author_id: str | None,
) -> VersionRow:
    """Version 1 of a new item (a fresh id under ``id_key``), written like
    every other version: through the team's lock, before the writer counts
    the dashboard version it announces."""
    values = {
        **fields,
        id_key: new_id(),
        "team_id": team_id,
        "version": 1,
        "session_id": session_id,
        "source_message_id": source_message_id,
        "author_kind": author_kind,
        "author_id": author_id,
    }
    row = await _insert_version(db, model, values, (id_key, "version"))
    if row is None:  # a fresh id already taken: not expected to happen
        raise Conflict(f"{id_key} clash; try again")
    return row


def _stale(what: str, current: int, expected: int) -> PreconditionFailed:
    return PreconditionFailed(
        f"{what} is at version {current}, not {expected}", current_version=current
    )
