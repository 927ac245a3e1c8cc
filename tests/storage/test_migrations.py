"""Migrations run up from empty, and back down, on SQLite and PostgreSQL;
the result matches the models; version rows are immutable below the ORM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from chathub.storage.db import create_engine
from chathub.storage.migrate import alembic_config, upgrade_async
from chathub.storage.models import Base
from tests.harness import create_pg_database, drop_pg_database, pg_url


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        return
    name = await create_pg_database()
    try:
        yield pg_url(name)
    finally:
        await drop_pg_database(name)


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_from_empty_creates_every_table(empty_db: str) -> None:
    await upgrade_async(empty_db)
    tables = await _tables(empty_db)
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


async def test_downgrade_to_base_and_up_again(empty_db: str) -> None:
    import asyncio

    from alembic import command

    await upgrade_async(empty_db)
    await asyncio.to_thread(command.downgrade, alembic_config(empty_db), "base")
    assert not (set(Base.metadata.tables) & await _tables(empty_db))
    await upgrade_async(empty_db)
    assert set(Base.metadata.tables) <= await _tables(empty_db)


async def test_models_and_migrations_agree(empty_db: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    await upgrade_async(empty_db)
    engine = create_engine(empty_db)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_version_rows_refuse_update_below_the_orm(empty_db: str) -> None:
    await upgrade_async(empty_db)
    engine = create_engine(empty_db)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO teams (id, name, created_at) VALUES ('t1', 'T', CURRENT_TIMESTAMP)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO state_versions (row_id, team_id, key, version, value, "
                    "author_kind, created_at) VALUES ('r1', 't1', 'k', 1, '1', 'user', "
                    "CURRENT_TIMESTAMP)"
                )
            )
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE state_versions SET version = 2"))
        if empty_db.startswith("postgresql"):
            with pytest.raises(DBAPIError):
                async with engine.begin() as conn:
                    await conn.execute(text("DELETE FROM state_versions"))
            async with engine.begin() as conn:  # an explicit purge may delete
                await conn.execute(text("SET LOCAL chathub.allow_purge = 'on'"))
                await conn.execute(text("DELETE FROM teams"))
        async with engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM state_versions"))).scalar()
        assert count == (0 if empty_db.startswith("postgresql") else 1)
    finally:
        await engine.dispose()
