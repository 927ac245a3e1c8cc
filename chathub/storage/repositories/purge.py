"""Erasing what was deleted long enough ago: sessions (with their messages
and summaries) and the records of files (their bytes went at the delete).

The only hard deletes of the data a team writes. Each call erases one batch
in its own transaction, so a large backlog never holds locks for long."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.storage.db import rowcount, transaction
from chathub.storage.models import ChatSession, File


async def purge_sessions(
    sessionmaker: async_sessionmaker[AsyncSession], *, deleted_before: datetime, limit: int
) -> int:
    """Erase up to ``limit`` sessions deleted before ``deleted_before``,
    with what cascades from them; returns how many."""
    async with transaction(sessionmaker) as db:
        if db.get_bind().dialect.name == "postgresql":
            # Session summaries are immutable versions: their rows may go
            # only in an explicit purge (see migration 0002).
            await db.execute(text("SET LOCAL chathub.allow_purge = 'on'"))
        ids = select(ChatSession.id).where(
            ChatSession.deleted_at.is_not(None), ChatSession.deleted_at < deleted_before
        )
        result = await db.execute(
            delete(ChatSession).where(ChatSession.id.in_(ids.limit(limit).scalar_subquery()))
        )
        return rowcount(result)


async def purge_files(
    sessionmaker: async_sessionmaker[AsyncSession], *, deleted_before: datetime, limit: int
) -> int:
    """Erase up to ``limit`` records of files deleted before
    ``deleted_before``; returns how many."""
    async with transaction(sessionmaker) as db:
        ids = select(File.id).where(File.deleted_at.is_not(None), File.deleted_at < deleted_before)
        result = await db.execute(
            delete(File).where(File.id.in_(ids.limit(limit).scalar_subquery()))
        )
        return rowcount(result)
