"""Apply the Alembic migrations shipped in the package to a database URL,
and tell whether a database's schema is the one this code needs."""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"  # alembic's default


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking: runs its own event loop, so call it outside one (or in a thread)."""
    command.upgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, url, revision)


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str:
    """The revision of the newest migration shipped: the schema this code needs."""
    head = _scripts().get_current_head()
    assert head is not None
    return head


@cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def schema_is_behind(revision: str | None) -> bool:
    """Whether a schema at ``revision`` lacks migrations this code needs
    (None: never migrated). A revision this code does not know is a newer
    one (a newer release migrated it, as in a rolling deploy): not behind,
    since migrations keep the previous release working."""
    return revision is None or (revision in _known_revisions() and revision != head_revision())


async def schema_revision(conn: AsyncConnection) -> str | None:
    """The revision a database's schema is at (None: never migrated)."""

    def read(sync: Connection) -> str | None:
        # What alembic's MigrationContext.get_current_revision reads, without
        # its log lines (this runs at every start and in /readyz).
        if not inspect(sync).has_table(VERSION_TABLE):
            return None
        revisions = sync.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
        return max(revisions, default=None)

    return await conn.run_sync(read)
