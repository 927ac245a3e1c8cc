"""Locks taken through the database, so that they hold across every server
process (replicas, ``--workers N``) that shares it.

``advisory_xact_lock`` is one named lock for the length of a transaction:
writers that name the same key run one after the other, whatever process
they are in. Keys are hashed to 64 bits; two keys that collide only make
unrelated writers wait for each other."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

_XACT_LOCK = select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("key"), 0)))


async def advisory_xact_lock(db: AsyncSession, key: str) -> None:
    """Wait for the lock named ``key``, then hold it until ``db``'s
    transaction commits or rolls back.

    On PostgreSQL a transaction advisory lock. Elsewhere a no-op: a SQLite
    transaction holds the database's one write lock from its first statement
    to its end (``BEGIN IMMEDIATE``, see ``storage.db``), which serialises
    more than any key would; callers rely on that only after a statement."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(_XACT_LOCK, {"key": key})
