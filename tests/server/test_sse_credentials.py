"""A REST request following a reply (``POST /chat/sessions/{id}/messages``)
keeps its credentials true as a socket does: once the key is revoked, the
member removed or the token expired, a server-sent event stream ends with an
``error`` event (``unauthorized``) and a JSON wait answers 401. The reply
goes on and is stored. Real server, real HTTP."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    Actor,
    RunningServer,
    TeamFixture,
    eventually,
    make_team,
    replicas,
    server_on,
)
from tests.server.test_socket_credentials import token_for

pytestmark = pytest.mark.timeout(90)

REPLY = "one two three four five six seven eight nine ten"
# One character every 1/8 s: the reply streams for about 6 s.
SLOW_LLM = f"scripted://?text={REPLY.replace(' ', '+')}&chunk=1&rate=8"


@pytest.fixture(scope="module")
async def srv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    data_dir: Path = tmp_path_factory.mktemp("sse-credentials")
    async with server_on("sqlite", data_dir, llm=SLOW_LLM) as running:
        yield running


@pytest.fixture
async def team(srv: RunningServer) -> TeamFixture:
    return await make_team(srv.state, f"Team {secrets.token_hex(4)}")


@pytest.fixture
async def http(srv: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        yield client


async def new_session(http: httpx.AsyncClient, team: TeamFixture) -> str:
    r = await http.post("/chat/sessions", json={}, headers=team.owner.headers)
    assert r.status_code == 201, r.text
    session_id: str = r.json()["id"]
    return session_id


async def take_away(http: httpx.AsyncClient, team: TeamFixture, actor: Actor, action: str) -> str:
    """Revoke the actor's key or remove the actor (or, for ``expire``, do
    nothing: their token runs out by itself). The reason the server gives."""
    if action == "revoke":
        r = await http.delete(f"/team/api-keys/{actor.api_key_id}", headers=team.owner.headers)
    elif action == "remove":
        r = await http.delete(f"/team/members/{actor.member_id}", headers=team.owner.headers)
    else:
        return "token expired"
    assert r.status_code == 204, r.text
    return "credentials revoked"


async def assistant_messages(
    http: httpx.AsyncClient, team: TeamFixture, session_id: str
) -> list[Any]:
    r = await http.get(
        f"/chat/sessions/{session_id}/messages",
        params={"role": "assistant"},
        headers=team.owner.headers,
    )
    assert r.status_code == 200, r.text
    items: list[Any] = r.json()["items"]
    return items


async def until_replying(http: httpx.AsyncClient, team: TeamFixture, session_id: str) -> None:
    """Return once the session's reply has started."""
    async with asyncio.timeout(20):
        while True:
            if await assistant_messages(http, team, session_id):
                return
            await asyncio.sleep(0.05)


async def stored_reply(http: httpx.AsyncClient, team: TeamFixture, session_id: str) -> Any:
    """The session's assistant message, once it is no longer streaming."""
    async with asyncio.timeout(30):
        while True:
            items = await assistant_messages(http, team, session_id)
            if items and items[0]["status"] != "streaming":
                return items[0]
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("action", ["revoke", "remove", "expire"])
async def test_a_stream_ends_with_an_error_event_when_its_credentials_go(
    http: httpx.AsyncClient, team: TeamFixture, action: str
) -> None:
    member = await team.actor("member")
    credential = token_for(member, expires_in=3) if action == "expire" else member.api_key
    session_id = await new_session(http, team)
    events: list[tuple[str, dict[str, Any]]] = []
    started = asyncio.Event()

    async def follow() -> None:
        async with http.stream(
            "POST",
            f"/chat/sessions/{session_id}/messages",
            json={"content": "hello"},
            headers={"Authorization": f"Bearer {credential}", "Accept": "text/event-stream"},
        ) as r:
            assert r.status_code == 200
            kind = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                    if kind == "reply.delta":
                        started.set()

    stream = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(20):
            await started.wait()
        reason = await take_away(http, team, member, action)
        async with asyncio.timeout(30):
            await stream  # the stream ends, the reply has not
    finally:
        stream.cancel()
    kinds = [kind for kind, _ in events]
    assert "reply.completed" not in kinds, kinds
    assert events[-1] == (
        "error",
        {"type": "error", "code": "unauthorized", "message": reason},
    ), events[-3:]
    reply = await stored_reply(http, team, session_id)
    assert reply["status"] == "complete" and reply["content"] == REPLY, reply


@pytest.mark.parametrize("action", ["revoke", "remove"])
async def test_a_json_wait_answers_401_when_its_credentials_go(
    http: httpx.AsyncClient, team: TeamFixture, action: str
) -> None:
    member = await team.actor("member")
    session_id = await new_session(http, team)
    send = asyncio.create_task(
        http.post(
            f"/chat/sessions/{session_id}/messages",
            json={"content": "hello"},
            headers=member.headers,
        )
    )
    try:
        await until_replying(http, team, session_id)
        reason = await take_away(http, team, member, action)
        async with asyncio.timeout(30):
            answer = await send
    finally:
        send.cancel()
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "unauthorized" and answer.json()["detail"] == reason
    reply = await stored_reply(http, team, session_id)
    assert reply["status"] == "complete" and reply["content"] == REPLY, reply


async def test_a_stream_of_a_caller_who_keeps_their_credentials_goes_to_its_end(
    http: httpx.AsyncClient, team: TeamFixture
) -> None:
    """Someone else's key revoked meanwhile: nothing changes for this one."""
    member = await team.actor("member")
    bystander = await team.actor("member")
    session_id = await new_session(http, team)
    kinds: list[str] = []
    async with http.stream(
        "POST",
        f"/chat/sessions/{session_id}/messages",
        json={"content": "hello"},
        headers=member.headers | {"Accept": "text/event-stream"},
    ) as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
                if kinds.count("reply.delta") == 1:
                    await take_away(http, team, bystander, "revoke")
    assert kinds[-1] == "reply.completed" and "error" not in kinds, kinds


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_json_wait_on_another_replica_answers_401_when_the_key_is_revoked(
    tmp_path: Path,
) -> None:
    """The reply runs on one replica; a retry of its message waits on the
    other (for the reply's ending event): revoking the key there, or here,
    ends that wait too."""
    async with replicas(tmp_path, llm=SLOW_LLM) as (a, b):
        team = await make_team(a.state, "Replicas")
        member = await team.actor("member")
        body = {"content": "hello", "client_msg_id": "c1"}
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            session_id = await new_session(on_a, team)
            first = asyncio.create_task(
                on_a.post(
                    f"/chat/sessions/{session_id}/messages", json=body, headers=member.headers
                )
            )
            retry = None
            try:
                await until_replying(on_a, team, session_id)
                retry = asyncio.create_task(
                    on_b.post(
                        f"/chat/sessions/{session_id}/messages", json=body, headers=member.headers
                    )
                )
                # The retry waits on b (for the reply's end) before the revoke.
                await eventually(lambda: bool(b.state.credentials.followed(team.team_id)))
                reason = await take_away(on_a, team, member, "revoke")
                async with asyncio.timeout(30):
                    answered, retried = await first, await retry
            finally:
                first.cancel()
                if retry is not None:
                    retry.cancel()
            for answer in (answered, retried):
                assert answer.status_code == 401, answer.text
                assert answer.json()["detail"] == reason
            reply = await stored_reply(on_a, team, session_id)
            assert reply["status"] == "complete" and reply["content"] == REPLY, reply
