"""The async engine and session factory, chosen by URL scheme."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError
from sqlalchemy import CursorResult, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def create_engine(url: str) -> AsyncEngine:
    """An engine for ``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``."""
    if url.startswith("sqlite"):
        # One connection: SQLite has one writer anyway, and waiters queued on
        # the pool are woken at once, where SQLite's own busy handler would
        # sleep up to 100 ms between retries. (So no code path may hold a
        # session while waiting for another: it would wait for the pool.)
        engine = create_async_engine(
            url, connect_args={"timeout": 30}, pool_size=1, max_overflow=0, pool_timeout=60
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver's own transaction handling starts no transaction before
            # a SAVEPOINT (whose RELEASE would then commit) and upgrades read
            # locks to write locks late (failing at once under contention).
            # SQLAlchemy emits BEGIN itself instead, see _begin below.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so concurrent writers
            # queue on the busy timeout instead of failing with SQLITE_BUSY.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits on success, rolls back on any error."""
    async with sessionmaker() as session, session.begin():
        yield session


def rowcount(result: Any) -> int:
    """The rows an UPDATE or DELETE matched (``Session.execute`` is typed
    as returning a plain ``Result``)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""OS errors about a file, not a connection: faults, never "unreachable"."""


def backend_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says a backing service could not be reached, or
    dropped the connection mid-statement (a restart, a failover, the
    network), rather than refusing what was asked of it: the request may
    succeed once it is back (503 ``unavailable``, or a retry).

    PostgreSQL: a refused connect is an ``OSError`` (not one about a
    file, such as a blob that is missing); a connection
    closed under a statement, a ``DBAPIError`` that invalidated it; a
    server shutting down or starting, SQLSTATE class 08 or 57P. Redis: any
    ``RedisError`` that reaches this far."""
    if isinstance(exc, OSError) and not isinstance(exc, _FILE_ERRORS):
        return True
    if isinstance(exc, PoolTimeout | RedisError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate.startswith(("08", "57P"))
    return False


T = TypeVar("T")


async def while_unreachable(
    call: Callable[[bool], Awaitable[T]],
    *,
    for_s: float,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``call(again)``, tried again while it fails because a backing service
    is unreachable (:func:`backend_unreachable`; a Redis ``ResponseError`` is
    an answer, not an outage) for up to ``for_s`` seconds: at once (a pooled
    connection the service closed gets a fresh one), then backing off from
    50 ms to 2 s. ``again`` is False on the first try only, so a call that
    may have gone through before its connection dropped can look for
    itself. The last error propagates; ``on_retry`` sees each one retried."""
    deadline = time.monotonic() + for_s
    delay = 0.0
    again = False
    while True:
        try:
            return await call(again)
        except Exception as exc:
            transient = backend_unreachable(exc) and not isinstance(exc, ResponseError)
            if not transient or time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(2.0, max(0.05, delay * 2))
            again = True
