"""A session's REST routes while its reply streams on one of two replicas
sharing PostgreSQL and Redis: a JSON retry of the message answers the
finished turn whichever replica it reaches, and deleting the session stops
the reply whichever replica the delete reaches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from chathub.storage.models import Message
from chathub.storage.repositories import sessions as sessions_repo
from tests import harness
from tests.harness import RunningServer, TeamFixture, make_team
from tests.server.test_ws import delta_text, new_session, scripted, send_message
from tests.wsclient import WsClient, reply_end

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(60)]

SLOW_TEXT = "".join(f"word{i:03d} " for i in range(80))  # 640 characters
RATE = 40  # chunks of 4 characters per second: the reply takes 4 s
REPLY_S = len(SLOW_TEXT) / 4 / RATE


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers on one fresh database and the test Redis."""
    llm = scripted(text=SLOW_TEXT, chunk=4, rate=RATE)
    async with harness.replicas(tmp_path, llm=llm) as (a, b):
        yield a, b


async def test_a_json_retry_on_another_replica_answers_once_the_reply_has_ended(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    a, b = replicas
    team = await make_team(a.state)
    h = team.owner.headers
    body = {"content": "hello", "client_msg_id": "c1"}
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        sid = await new_session(on_a, team.owner)
        ws = await WsClient.connect(a.ws_url, team.owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            first = asyncio.create_task(
                on_a.post(f"/chat/sessions/{sid}/messages", json=body, headers=h)
            )
            await ws.until(lambda f: f["type"] == "reply.delta")
            retried_at = time.monotonic()
            retry = await on_b.post(f"/chat/sessions/{sid}/messages", json=body, headers=h)
            took = time.monotonic() - retried_at
            end = await ws.first(reply_end())
            answered = await first
        finally:
            await ws.close()
    assert answered.status_code == 201, answered.text
    assert retry.status_code == 200, retry.text
    turn = retry.json()
    assert turn["duplicate"] is True
    assert turn["message"] == answered.json()["message"]
    # The finished reply, as the first answer and the socket have it.
    assert turn["reply"] == answered.json()["reply"]
    assert turn["reply"]["status"] == "complete" and turn["reply"]["content"] == SLOW_TEXT
    assert turn["reply"]["usage"] == end["usage"]
    assert took > REPLY_S / 2  # it waited for the end


@pytest.mark.parametrize("where", ["same", "other"])
async def test_deleting_a_session_stops_its_reply_on_either_replica(
    replicas: tuple[RunningServer, RunningServer], where: str
) -> None:
    a, b = replicas
    team: TeamFixture = await make_team(a.state)
    deleting = a if where == "same" else b
    ws = await WsClient.connect(a.ws_url, team.owner.api_key)
    watcher = await WsClient.connect(b.ws_url, team.owner.api_key)
    try:
        async with httpx.AsyncClient(base_url=deleting.url, timeout=30) as client:
            sid = await new_session(client, team.owner)
            await ws.request({"type": "join", "session_id": sid})
            await watcher.request({"type": "join", "session_id": sid})
            reply_id = (await send_message(ws, sid, "c1"))["reply_id"]
            for _ in range(5):
                await ws.until(lambda f: f["type"] == "reply.delta")
            deleted_at = time.monotonic()
            r = await client.delete(f"/chat/sessions/{sid}", headers=team.owner.headers)
            assert r.status_code == 204, r.text
        # Both sockets still joined see the reply end as a cancelled one does.
        end = (await ws.until(reply_end(reply_id), timeout=10))[-1]
        took = time.monotonic() - deleted_at
        watched = (await watcher.until(reply_end(reply_id), timeout=10))[-1]
    finally:
        await ws.close()
        await watcher.close()
    assert end["type"] == "reply.completed" and end["stop_reason"] == "cancelled", end
    assert watched == end
    partial = delta_text(ws.seen, reply_id)
    assert partial and SLOW_TEXT.startswith(partial) and partial != SLOW_TEXT
    assert end["message"]["content"] == partial
    assert end["usage"]["estimated"] is True
    assert took < REPLY_S / 2
    async with a.state.sessionmaker() as db:
        stored = await sessions_repo.reply_by_id(db, reply_id=reply_id)
    assert stored is not None
    assert (stored.status, stored.stop_reason, stored.content) == ("complete", "cancelled", partial)


async def test_a_session_deleted_while_a_message_is_sent_to_it_keeps_no_running_reply(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    """A send and a delete at the same moment, on two replicas, many times:
    either the send is refused (the session is gone) or its reply is stopped
    by the delete. No reply of a deleted session runs to its end."""
    a, b = replicas
    team = await make_team(a.state)
    h = team.owner.headers
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        sessions = [await new_session(on_a, team.owner) for _ in range(25)]

        async def delete_after(sid: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            await on_b.delete(f"/chat/sessions/{sid}", headers=h)

        for n, sid in enumerate(sessions):
            # From the delete well first to the send well first, through a tie.
            await asyncio.gather(
                on_a.post(
                    f"/chat/sessions/{sid}/messages",
                    json={"content": "hello"},
                    headers=h | {"accept": "text/event-stream"},
                ),
                delete_after(sid, (n % 5) * 0.005),
            )
        deadline = time.monotonic() + REPLY_S + 10
        while True:
            async with a.state.sessionmaker() as db:
                stops = list(
                    await db.scalars(
                        select(Message.stop_reason).where(
                            Message.session_id.in_(sessions), Message.role == "assistant"
                        )
                    )
                )
            if None not in stops or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert stops and set(stops) <= {"cancelled"}, stops
