"""Deleted sessions and file records are erased once they have been deleted
longer than ``CHATHUB_PURGE_DELETED_AFTER_DAYS``, with their messages and
summaries; what was deleted since, and what is live, stays."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import func, select, update

from chathub.config import Settings
from chathub.server.purger import Purger
from chathub.storage.db import transaction
from chathub.storage.models import ChatSession, File, Message, SessionSummary, utcnow
from chathub.storage.repositories import summaries
from tests.handlers.test_files import upload
from tests.harness import RunningServer, TeamFixture


async def chat(client: httpx.AsyncClient, team: TeamFixture, title: str) -> str:
    h = team.owner.headers
    sid: str = (await client.post("/chat/sessions", json={"title": title}, headers=h)).json()["id"]
    r = await client.post(f"/chat/sessions/{sid}/messages", json={"content": "hi"}, headers=h)
    assert r.status_code == 201, r.text
    return sid


async def test_what_was_deleted_long_enough_ago_is_erased(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    old, recent, live = [await chat(client, team, t) for t in ("old", "recent", "live")]
    async with transaction(clean_server.state.sessionmaker) as db:
        first = await db.scalar(select(Message.id).where(Message.session_id == old).limit(1))
        assert first is not None
        await summaries.add(db, team_id=team.team_id, session_id=old, text="s", covers_until=first)
    files = [(await upload(client, h, f"file {i}".encode())).json()["id"] for i in range(3)]
    for path in (
        f"/chat/sessions/{old}",
        f"/chat/sessions/{recent}",
        *(f"/files/{f}" for f in files[:2]),
    ):
        assert (await client.delete(path, headers=h)).status_code == 204
    # The old ones were deleted 31 days ago.
    long_ago = utcnow() - timedelta(days=31)
    async with transaction(clean_server.state.sessionmaker) as db:
        await db.execute(
            update(ChatSession).where(ChatSession.id == old).values(deleted_at=long_ago)
        )
        await db.execute(update(File).where(File.id == files[0]).values(deleted_at=long_ago))

    purger = Purger(settings=Settings(), sessionmaker=clean_server.state.sessionmaker)
    assert await purger.purge_once() == (1, 1)
    assert await purger.purge_once() == (0, 0)

    async with clean_server.state.sessionmaker() as db:
        sessions = set(await db.scalars(select(ChatSession.id)))
        counted = select(Message.session_id, func.count()).group_by(Message.session_id)
        by_session = {sid: n for sid, n in (await db.execute(counted)).all()}
        summarised = set(await db.scalars(select(SessionSummary.session_id)))
        file_ids = set(await db.scalars(select(File.id)))
    assert sessions == {recent, live}
    assert by_session == {recent: 2, live: 2}
    assert summarised == set()
    assert file_ids == set(files[1:])
    r = await client.get(f"/chat/sessions/{live}/messages", headers=h)
    assert len(r.json()["items"]) == 2


async def test_zero_days_keeps_everything(clean_server: RunningServer) -> None:
    purger = Purger(
        settings=Settings(purge_deleted_after_days=0), sessionmaker=clean_server.state.sessionmaker
    )
    purger.start()
    assert purger._task is None
