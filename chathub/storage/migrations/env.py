"""Alembic environment: runs migrations on the async engine of the given URL.

On PostgreSQL the migrations run under a transaction-level advisory lock:
replicas (or deploy jobs) that upgrade at once queue on it, and the later
ones find the schema at head and do nothing.

On SQLite, foreign keys are off while the migrations run: batch mode
rebuilds a table by dropping the old one, and with foreign keys on, that
drop would cascade into (delete) every row that references it. The whole
upgrade is one transaction; before it commits, ``PRAGMA foreign_key_check``
must find nothing, or all of it rolls back.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from chathub.storage.db import create_engine
from chathub.storage.models import Base

config = context.config
target_metadata = Base.metadata

# pg_advisory_xact_lock key of chathub's migrations (any constant will do, as
# long as every version uses the same one).
MIGRATION_LOCK_KEY = 0x63686174687562  # "chathub"


def _sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    """SQLite ignores this PRAGMA inside a transaction: run it on the driver
    connection directly, where SQLAlchemy does not begin one."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    finally:
        cursor.close()


def _check_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        rows = "; ".join(f"{row[0]} row {row[1]} -> {row[2]}" for row in broken[:10])
        raise RuntimeError(
            f"the migration left {len(broken)} rows whose foreign key points nowhere "
            f"(rolled back): {rows}"
        )


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _sqlite_foreign_keys(connection, on=False)
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,
            compare_type=True,
            # SQLite's DDL is transactional (alembic assumes not, for the old
            # driver that committed before each DDL statement; ours runs in
            # autocommit mode and SQLAlchemy emits BEGIN): one transaction for
            # the whole upgrade, so a failed check rolls all of it back.
            transactional_ddl=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            context.run_migrations()
            if sqlite:
                _check_foreign_keys(connection)
    finally:
        if sqlite:
            _sqlite_foreign_keys(connection, on=True)


async def _run_async() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
