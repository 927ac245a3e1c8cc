"""The ``sessions`` channel: a socket subscribed to it hears of every session
of its team created, changed or deleted over REST, on any replica, in the
order the writes committed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chathub.auth import Principal
from chathub.server.connection import Connection
from chathub.server.hub import Hub
from chathub.server.redis_bus import RedisBus
from chathub.server.session_log import MemorySessionLog
from tests.harness import (
    RunningServer,
    TeamFixture,
    eventually,
    http_client,
    make_team,
    replicas,
)
from tests.server.test_session_log_contract import kill_client, pubsub_client_ids
from tests.wsclient import WsClient


async def quiet(ws: WsClient) -> list[dict[str, Any]]:
    """The frames before the answer to a ping: every event published before
    the ping was sent (in process, a REST write publishes before it returns)."""
    pong = await ws.request({"type": "ping"})
    assert pong["type"] == "pong"
    frames = [f for f in ws.seen[:-1] if f["type"].startswith("session")]
    ws.seen.clear()
    return frames


async def subscribed(server: RunningServer, token: str) -> WsClient:
    ws = await WsClient.connect(server.ws_url, token)
    ack = await ws.request({"type": "subscribe", "channel": "sessions"})
    assert ack == {"type": "ack", "id": ack["id"], "channel": "sessions"}
    ws.seen.clear()
    return ws


async def test_created_changed_and_deleted_sessions_are_pushed_to_the_team(
    clean_server: RunningServer,
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
) -> None:
    viewer = await team.actor("viewer")
    ws = await subscribed(clean_server, viewer.api_key)  # any role may follow the list
    outsider = await subscribed(clean_server, other_team.owner.api_key)
    try:
        r = await client.post("/chat/sessions", json={"title": "plans"}, headers=team.owner.headers)
        assert r.status_code == 201, r.text
        created = r.json()
        sid = created["id"]
        assert await quiet(ws) == [{"type": "session.created", "session": created}]

        url, changes = f"/chat/sessions/{sid}", {"title": "plans, v2", "archived": True}
        r = await client.patch(url, json=changes, headers=team.owner.headers)
        assert r.status_code == 200, r.text
        changed = r.json()
        assert changed["updated_at"] > created["updated_at"]
        assert await quiet(ws) == [{"type": "session.updated", "session": changed}]

        # What the session already has changes nothing, and says nothing.
        r = await client.patch(url, json=changes, headers=team.owner.headers)
        assert r.status_code == 200, r.text
        assert r.json() == changed
        assert await quiet(ws) == []

        r = await client.delete(f"/chat/sessions/{sid}", headers=team.owner.headers)
        assert r.status_code == 204, r.text
        assert await quiet(ws) == [{"type": "session.deleted", "session_id": sid}]
        r = await client.delete(f"/chat/sessions/{sid}", headers=team.owner.headers)
        assert r.status_code == 404

        # A refused write announces nothing.
        r = await client.post("/chat/sessions", json={"title": "x"}, headers=viewer.headers)
        assert r.status_code == 403
        r = await client.post(
            "/chat/sessions", json={"mode": "no-such-mode"}, headers=team.owner.headers
        )
        assert r.status_code == 400
        assert await quiet(ws) == []
        assert await quiet(outsider) == []  # another team's sessions, never

        ack = await ws.request({"type": "unsubscribe", "channel": "sessions"})
        assert ack["type"] == "ack" and ack["channel"] == "sessions"
        r = await client.post("/chat/sessions", json={"title": "y"}, headers=team.owner.headers)
        assert r.status_code == 201
        assert await quiet(ws) == []
    finally:
        await ws.close()
        await outsider.close()


async def test_concurrent_changes_of_other_fields_end_on_what_the_database_holds(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    """Two PATCHes at once, of the title and of ``archived``: each reads what
    the other wrote before it writes, so the last event (and each answer)
    is the whole session as stored."""
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={"title": "t"}, headers=h)).json()["id"]
    url = f"/chat/sessions/{sid}"
    ws = await subscribed(clean_server, team.owner.api_key)
    try:
        for i in range(10):
            await asyncio.gather(
                client.patch(url, json={"title": f"title {i}"}, headers=h),
                client.patch(url, json={"archived": i % 2 == 0}, headers=h),
            )
            stored = (await client.get(url, headers=h)).json()
            events = await quiet(ws)
            assert len(events) == 2
            assert events[-1] == {"type": "session.updated", "session": stored}
    finally:
        await ws.close()


async def test_a_change_racing_a_delete_is_never_announced_after_it(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    ws = await subscribed(clean_server, team.owner.api_key)
    try:
        for i in range(25):
            sid = (await client.post("/chat/sessions", json={"title": "t"}, headers=h)).json()["id"]
            url = f"/chat/sessions/{sid}"
            patched, deleted = await asyncio.gather(
                client.patch(url, json={"title": f"title {i}"}, headers=h),
                client.delete(url, headers=h),
            )
            assert (patched.status_code, deleted.status_code) in ((200, 204), (404, 204))
            events = [e["type"] for e in await quiet(ws)]
            assert events[-1] == "session.deleted", events
            assert len(events) == (3 if patched.status_code == 200 else 2), events
    finally:
        await ws.close()


async def test_other_channels_are_refused(clean_server: RunningServer, team: TeamFixture) -> None:
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        err = await ws.request({"type": "subscribe", "channel": "session"})
        assert err["type"] == "error" and err["code"] == "bad_request"
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
    finally:
        await ws.close()


async def test_messages_and_reply_endings_are_pushed_as_activity(
    clean_server: RunningServer,
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
) -> None:
    """A message stored and its reply's end each move the session on: a
    ``session.activity`` with the event's seq and the time, which the
    session's ``last_message_at`` then holds."""
    viewer = await team.actor("viewer")
    headers = team.owner.headers
    r = await client.post("/chat/sessions", json={"title": "busy"}, headers=headers)
    created = r.json()
    sid = created["id"]
    assert created["last_message_at"] is None
    ws = await subscribed(clean_server, viewer.api_key)
    outsider = await subscribed(clean_server, other_team.owner.api_key)
    try:
        url = f"/chat/sessions/{sid}/messages"
        r = await client.post(url, json={"content": "hi"}, headers=headers)
        assert r.status_code == 201, r.text
        turn = r.json()
        frames = await quiet(ws)
        session = (await client.get(f"/chat/sessions/{sid}", headers=headers)).json()
        assert frames == [
            {
                "type": "session.activity",
                "session_id": sid,
                "last_seq": 1,  # message.created
                "last_message_at": turn["message"]["created_at"],
            },
            {
                "type": "session.activity",
                "session_id": sid,
                "last_seq": session["last_seq"],  # reply.completed
                "last_message_at": turn["reply"]["completed_at"],
            },
        ]
        assert session["last_message_at"] == turn["reply"]["completed_at"]
        assert session["last_seq"] > 2
        listed = (await client.get("/chat/sessions", headers=headers)).json()["items"]
        assert [s["last_message_at"] for s in listed] == [turn["reply"]["completed_at"]]
        assert await quiet(outsider) == []
    finally:
        await ws.close()
        await outsider.close()


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[list[RunningServer]]:
    async with replicas(tmp_path) as servers:
        yield servers


async def read_titles(ws: WsClient, sid: str, until_title: str) -> list[str]:
    """The titles of ``sid``'s updates, up to one with ``until_title`` and a
    moment of silence after it."""
    titles: list[str] = []
    while True:
        try:
            frame = await ws.recv(timeout=1.0 if until_title in titles else 10.0)
        except TimeoutError:
            return titles
        if frame["type"] == "session.updated" and frame["session"]["id"] == sid:
            titles.append(frame["session"]["title"])


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_concurrent_renames_on_two_replicas_reach_subscribers_in_commit_order(
    two: list[RunningServer],
) -> None:
    """A sidebar that applies the events as they come ends with the title the
    database ended with, on whichever replica it is connected."""
    a, b = two
    team = await make_team(a.state, "Renamers")
    headers = team.owner.headers
    sockets = [await subscribed(a, team.owner.api_key), await subscribed(b, team.owner.api_key)]
    try:
        async with http_client(a) as http_a, http_client(b) as http_b:
            r = await http_a.post("/chat/sessions", json={"title": "t"}, headers=headers)
            sid = r.json()["id"]

            async def rename(http: httpx.AsyncClient, title: str) -> None:
                r = await http.patch(
                    f"/chat/sessions/{sid}", json={"title": title}, headers=headers
                )
                assert r.status_code == 200, r.text

            for round in range(3):
                await asyncio.gather(
                    *(rename((http_a, http_b)[i % 2], f"title {round}.{i}") for i in range(30))
                )
                final = (await http_a.get(f"/chat/sessions/{sid}", headers=headers)).json()
                for ws in sockets:
                    titles = await read_titles(ws, sid, final["title"])
                    assert len(titles) == 30
                    assert titles[-1] == final["title"]
    finally:
        for ws in sockets:
            await ws.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_activity_on_one_replica_reaches_subscribers_on_the_other(
    two: list[RunningServer],
) -> None:
    a, b = two
    team = await make_team(a.state, "Chatters")
    ws = await subscribed(b, team.owner.api_key)
    try:
        async with http_client(a) as http_a:
            r = await http_a.post("/chat/sessions", json={}, headers=team.owner.headers)
            sid = r.json()["id"]
            r = await http_a.post(
                f"/chat/sessions/{sid}/messages", json={"content": "hi"}, headers=team.owner.headers
            )
            assert r.status_code == 201, r.text
            ended_at = r.json()["reply"]["completed_at"]
            session = (await http_a.get(f"/chat/sessions/{sid}", headers=team.owner.headers)).json()
        seen = await ws.until(
            lambda f: f["type"] == "session.activity" and f["last_seq"] == session["last_seq"]
        )
        activity = [f for f in seen if f["type"] == "session.activity"]
        assert [f["last_seq"] for f in activity] == [1, session["last_seq"]]
        assert activity[-1]["last_message_at"] == ended_at == session["last_message_at"]
    finally:
        await ws.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_a_bus_reconnection_tells_subscribers_to_reload(
    two: list[RunningServer],
) -> None:
    a, b = two
    bus = a.state.bus
    assert isinstance(bus, RedisBus)
    team = await make_team(a.state, "Reconnect")
    ws = await subscribed(a, team.owner.api_key)
    try:
        (old_id,) = await pubsub_client_ids(bus.subscription.name)
        await kill_client(old_id)
        await eventually(lambda: bus.subscription.connects == 2)
        assert await ws.expect("sessions.resync") == {"type": "sessions.resync"}
        # And the feed goes on.
        async with http_client(b) as http:
            r = await http.post(
                "/chat/sessions", json={"title": "after"}, headers=team.owner.headers
            )
            assert r.status_code == 201
        frame = await ws.expect("session.created")
        assert frame["session"] == r.json()
    finally:
        await ws.close()


async def test_a_closed_socket_is_forgotten_by_the_channel() -> None:
    hub = Hub(MemorySessionLog())
    conn = Connection(None, "c1", Principal("m1", "t1", "viewer"), max_queue=10)
    hub.register(conn)
    hub.subscribe_sessions(conn)
    hub.send_sessions("t1", "f1")
    assert await conn.take() == ["f1"]
    hub.unregister(conn)
    assert hub._by_team_sessions == {}
    hub.send_sessions("t1", "f2")
    assert conn.queue_depth == 0
