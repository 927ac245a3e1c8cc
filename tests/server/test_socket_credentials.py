"""An open socket's credentials stay true: a revoked key, a removed member
or an expired token closes the socket (4401), a demoted member acts with
the new role from the next frame, and a fresh ``auth`` frame extends a
socket's life. Real servers and sockets; both databases, and two replicas
sharing PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from chathub.server import credentials
from chathub.server.redis_bus import RedisBus
from chathub.storage.db import transaction
from chathub.storage.repositories import teams
from tests.harness import (
    JWT_SECRET,
    REDIS_URL,
    Actor,
    RunningServer,
    TeamFixture,
    create_pg_database,
    drop_pg_database,
    eventually,
    make_team,
    pg_url,
    replicas,
    server_on,
    start_server,
    test_settings,
)
from tests.server.test_session_log_contract import kill_client, pubsub_client_ids
from tests.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


def token_for(actor: Actor, *, expires_in: float, role: str | None = None) -> str:
    """A JWT as ``POST /auth/token`` issues one, expiring in ``expires_in`` s."""
    now = int(time.time())
    claims = {
        "sub": actor.member_id,
        "team_id": actor.team_id,
        "role": role or actor.role,
        "kid": actor.api_key_id,
        "iat": now,
        "exp": now + expires_in,
        "aud": "chathub",
        "iss": "chathub",
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def closed_with(ws: WsClient, timeout: float = 10) -> tuple[int | None, str | None]:
    """Wait for the server to close the socket; its close code and reason."""
    with pytest.raises(ConnectionClosed):
        await ws.until(lambda _frame: False, timeout=timeout)
    return ws.conn.close_code, ws.conn.close_reason


async def still_open(ws: WsClient) -> None:
    pong = await ws.request({"type": "ping"})
    assert pong["type"] == "pong"


async def new_session(http: httpx.AsyncClient, actor: Actor) -> str:
    r = await http.post("/chat/sessions", json={}, headers=actor.headers)
    assert r.status_code == 201, r.text
    session_id: str = r.json()["id"]
    return session_id


@pytest.fixture
async def http(clean_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=clean_server.url, timeout=15) as client:
        yield client


async def test_revoking_a_key_closes_the_sockets_opened_with_it_or_its_tokens(
    clean_server: RunningServer, team: TeamFixture, http: httpx.AsyncClient
) -> None:
    member = await team.actor("member")
    token = (await http.post("/auth/token", json={"api_key": member.api_key})).json()
    by_key = await WsClient.connect(clean_server.ws_url, member.api_key)
    by_token = await WsClient.connect(clean_server.ws_url, token["access_token"])
    bystander = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        r = await http.delete(f"/team/api-keys/{member.api_key_id}", headers=team.owner.headers)
        assert r.status_code == 204
        assert await closed_with(by_key) == (4401, "credentials revoked")
        assert await closed_with(by_token) == (4401, "credentials revoked")
        await still_open(bystander)
    finally:
        for ws in (by_key, by_token, bystander):
            await ws.conn.close()


async def test_removing_a_member_closes_their_sockets(
    clean_server: RunningServer, team: TeamFixture, http: httpx.AsyncClient
) -> None:
    member = await team.actor("member")
    ws = await WsClient.connect(clean_server.ws_url, member.api_key, first_frame_auth=True)
    try:
        r = await http.delete(f"/team/members/{member.member_id}", headers=team.owner.headers)
        assert r.status_code == 204
        assert await closed_with(ws) == (4401, "credentials revoked")
    finally:
        await ws.conn.close()


async def test_a_demoted_member_acts_with_the_new_role_on_an_open_socket(
    clean_server: RunningServer, team: TeamFixture, http: httpx.AsyncClient
) -> None:
    admin = await team.actor("admin")
    session_id = await new_session(http, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, admin.api_key)
    try:
        assert ws.welcome["user"]["role"] == "admin"
        r = await http.patch(
            f"/team/members/{admin.member_id}", json={"role": "viewer"}, headers=team.owner.headers
        )
        assert r.status_code == 200 and r.json()["role"] == "viewer"
        state = clean_server.state
        (conn,) = state.hub.team_connections(team.team_id)
        await eventually(lambda: conn.principal.role == "viewer")
        refused = await ws.request(
            {
                "type": "message.send",
                "session_id": session_id,
                "client_msg_id": "m1",
                "content": "hello",
            }
        )
        assert refused["type"] == "error" and refused["code"] == "forbidden", refused
        joined = await ws.request({"type": "join", "session_id": session_id})
        assert joined["type"] == "ack"  # a viewer may still follow the session
    finally:
        await ws.conn.close()


async def test_a_socket_closes_when_its_token_expires(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    token = token_for(team.owner, expires_in=2)
    ws = await WsClient.connect(clean_server.ws_url, token)
    try:
        assert (
            ws.welcome["expires_at"]
            == jwt.decode(token, options={"verify_signature": False})["exp"]
        )
        assert await closed_with(ws) == (4401, "token expired")
    finally:
        await ws.conn.close()


async def test_a_fresh_auth_frame_keeps_a_socket_open_past_its_first_token(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    ws = await WsClient.connect(clean_server.ws_url, token_for(team.owner, expires_in=2))
    key_ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert "expires_at" not in key_ws.welcome  # an API key does not expire
        fresh = token_for(team.owner, expires_in=3600)
        ack = await ws.request({"type": "auth", "token": fresh})
        assert ack["type"] == "ack" and ack["role"] == "owner", ack
        assert ack["expires_at"] > time.time() + 3000
        await asyncio.sleep(3)
        await still_open(ws)
    finally:
        await ws.conn.close()
        await key_ws.conn.close()


async def test_a_refresh_with_a_bad_or_foreign_token_is_refused_and_changes_nothing(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    other = await team.actor("member")
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        bad = await ws.request({"type": "auth", "token": "not-a-token"})
        assert bad["type"] == "error" and bad["code"] == "unauthorized", bad
        foreign = await ws.request({"type": "auth", "token": other.api_key})
        assert foreign["type"] == "error" and foreign["code"] == "forbidden", foreign
        (conn,) = [
            c
            for c in clean_server.state.hub.team_connections(team.team_id)
            if c.principal.member_id == team.owner.member_id
        ]
        assert conn.principal.role == "owner" and conn.principal.expires_at is None
        await still_open(ws)
    finally:
        await ws.conn.close()


async def test_a_change_made_without_the_api_is_caught_before_the_next_frame(
    clean_server: RunningServer,
    team: TeamFixture,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No announcement (a key revoked in the database directly, or a lost
    bus message): a frame after the recheck interval finds it."""
    member = await team.actor("member")
    session_id = await new_session(http, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, member.api_key)
    try:
        async with transaction(clean_server.state.sessionmaker) as db:
            key = await teams.get_api_key(db, team_id=team.team_id, key_id=member.api_key_id)
            await teams.revoke_api_key(db, key)
        await still_open(ws)  # a ping reads nothing of the team's
        monkeypatch.setattr(credentials, "RECHECK_S", 0.0)
        refused = await ws.request({"type": "join", "session_id": session_id})
        assert refused["type"] == "error" and refused["code"] == "unauthorized", refused
        assert await closed_with(ws) == (4401, "credentials revoked")
    finally:
        await ws.conn.close()


async def test_a_key_made_while_its_member_is_demoted_does_not_keep_the_old_role(
    clean_server: RunningServer, team: TeamFixture, http: httpx.AsyncClient
) -> None:
    """Keys created for oneself while an owner demotes you: every one of
    them ends at the new role, and none of them can act as an admin."""
    admin = await team.actor("admin")

    async def create_keys(loop: int) -> list[str]:
        secrets = []
        for i in range(8):
            r = await http.post(
                "/team/api-keys",
                json={"name": f"k{loop}-{i}", "role": "admin"},
                headers=admin.headers,
            )
            if r.status_code == 201:
                secrets.append(r.json()["api_key"])
        return secrets

    async def demote() -> list[str]:
        await asyncio.sleep(0.02)
        r = await http.patch(
            f"/team/members/{admin.member_id}", json={"role": "viewer"}, headers=team.owner.headers
        )
        assert r.status_code == 200, r.text
        return []

    created = await asyncio.gather(*(create_keys(loop) for loop in range(4)), demote())
    secrets = [secret for batch in created for secret in batch]
    assert secrets  # some were made before the demotion
    r = await http.get("/team/api-keys", params={"limit": 100}, headers=team.owner.headers)
    keys = r.json()
    roles = {k["role"] for k in keys["items"] if k["member_id"] == admin.member_id}
    assert roles == {"viewer"}, roles
    for secret in secrets:
        r = await http.get("/team/api-keys", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 403, r.text


async def test_a_token_with_a_key_id_that_is_not_a_string_is_unauthorized(
    clean_server: RunningServer, team: TeamFixture, http: httpx.AsyncClient
) -> None:
    now = int(time.time())
    claims = {
        "sub": team.owner.member_id,
        "team_id": team.team_id,
        "role": "owner",
        "kid": {"not": "a string"},
        "iat": now,
        "exp": now + 60,
        "aud": "chathub",
        "iss": "chathub",
    }
    token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    r = await http.get("/chat/sessions", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401, r.text


# -- two replicas -------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_revocation_on_one_replica_closes_the_sockets_on_another(
    tmp_path: Path,
) -> None:
    async with replicas(tmp_path) as (a, b):
        team = await make_team(a.state, "Replicas")
        member = await team.actor("member")
        ws = await WsClient.connect(b.ws_url, member.api_key)
        try:
            async with httpx.AsyncClient(base_url=a.url, timeout=15) as http:
                r = await http.delete(
                    f"/team/api-keys/{member.api_key_id}", headers=team.owner.headers
                )
                assert r.status_code == 204
            assert await closed_with(ws) == (4401, "credentials revoked")
        finally:
            await ws.conn.close()


async def test_a_listening_socket_is_checked_again_without_any_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change nobody announced (made in the database directly, or an
    announcement lost while the database did not answer) reaches a socket
    that only listens: the sweep checks every socket again each RECHECK_S."""
    monkeypatch.setattr(credentials, "RECHECK_S", 0.3)
    async with server_on("sqlite", tmp_path) as srv:
        team = await make_team(srv.state, "Acme")
        member = await team.actor("member")
        ws = await WsClient.connect(srv.ws_url, member.api_key)
        try:
            async with transaction(srv.state.sessionmaker) as db:
                key = await teams.get_api_key(db, team_id=team.team_id, key_id=member.api_key_id)
                await teams.revoke_api_key(db, key)
            assert await closed_with(ws) == (4401, "credentials revoked")
        finally:
            await ws.conn.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_every_socket_is_checked_again_when_the_bus_comes_back(tmp_path: Path) -> None:
    """An announcement published while this instance's bus connection was
    down never arrives: once the bus is back, every socket is checked."""
    name = await create_pg_database()
    try:
        settings = test_settings(pg_url(name), tmp_path, redis_url=REDIS_URL)
        srv = await start_server(settings)
        try:
            team = await make_team(srv.state, "Acme")
            member = await team.actor("member")
            ws = await WsClient.connect(srv.ws_url, member.api_key)
            try:
                async with transaction(srv.state.sessionmaker) as db:
                    key = await teams.get_api_key(
                        db, team_id=team.team_id, key_id=member.api_key_id
                    )
                    await teams.revoke_api_key(db, key)
                bus = srv.state.bus
                assert isinstance(bus, RedisBus)
                (client_id,) = await pubsub_client_ids(bus.subscription.name)
                await kill_client(client_id)
                assert await closed_with(ws, timeout=15) == (4401, "credentials revoked")
            finally:
                await ws.conn.close()
        finally:
            await srv.stop()
    finally:
        await drop_pg_database(name)
