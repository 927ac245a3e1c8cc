"""Several ``chathub db upgrade`` at once on one PostgreSQL database (the
replicas of a deploy, each running it first): they queue on an advisory
lock; the first migrates, the later ones find the schema at head."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from chathub.storage.migrate import head_revision
from tests.harness import PG_HOST, PG_PORT, PG_USER, create_pg_database, drop_pg_database, pg_url

pytestmark = pytest.mark.postgres

CHATHUB = Path(sys.executable).parent / "chathub"


async def _upgrade(url: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    proc = await asyncio.create_subprocess_exec(
        str(CHATHUB),
        "db",
        "upgrade",
        env=env | {"CHATHUB_DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.timeout(240)
async def test_concurrent_upgrades_all_succeed() -> None:
    for _ in range(2):  # the race, when there was one, lost about one run in two
        name = await create_pg_database()
        try:
            results = await asyncio.gather(*(_upgrade(pg_url(name)) for _ in range(3)))
            for code, out in results:
                assert code == 0, out
                assert "up to date" in out and "Traceback" not in out, out
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
            try:
                versions = await conn.fetch("SELECT version_num FROM alembic_version")
            finally:
                await conn.close()
            assert [r["version_num"] for r in versions] == [head_revision()]
        finally:
            await drop_pg_database(name)
