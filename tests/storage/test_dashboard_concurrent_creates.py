"""Creates count the dashboard version the way every other change does: new
tasks and insights written at the same moment (extraction's writes, REST
creates) announce different versions, rising in the order they commit."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as repo
from tests.harness import RunningServer, TeamFixture

Maker = async_sessionmaker[AsyncSession]


async def test_concurrent_creates_get_distinct_dashboard_versions(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    sm = clean_server.state.sessionmaker
    async with transaction(sm) as db:
        start = await repo.dashboard_version(db, team_id=team.team_id)
    committed: list[int] = []
    gate = asyncio.Event()

    async def create(i: int) -> int:
        async with transaction(sm) as db:
            await gate.wait()
            if i % 2:
                await repo.create_task(
                    db, team_id=team.team_id, title=f"task {i}", author_kind="extractor"
                )
            else:
                await repo.create_insight(
                    db, team_id=team.team_id, text=f"insight {i}", author_kind="model"
                )
            announced = await repo.dashboard_version(db, team_id=team.team_id)
            await asyncio.sleep(0.01)  # others write meanwhile, where they can
        committed.append(announced)
        return announced

    tasks = [asyncio.create_task(create(i)) for i in range(12)]
    await asyncio.sleep(0.05)
    gate.set()
    announced = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert sorted(announced) == list(range(start + 1, start + 13))
    assert committed == sorted(committed)
