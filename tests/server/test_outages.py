"""A reply streaming while Redis or PostgreSQL goes away for a few seconds,
over its end: it ends once the service is back, with every character the
model wrote, once; what the service's outage refuses meanwhile is refused
as ``unavailable`` (503), never as an internal error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.harness import (
    REDIS_URL,
    RunningServer,
    create_pg_database,
    drop_pg_database,
    http_client,
    make_team,
    server_on,
    start_server,
    test_settings,
)
from tests.proxy import PgProxy, RedisProxy, TcpProxy
from tests.server.test_ws import delta_text, new_session, reply_finished, scripted, send_message
from tests.wsclient import WsClient

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

TEXT = "".join(f"word{i:03d} " for i in range(100))  # 800 characters
RATE = 50  # chunks of 4 characters per second: the reply takes 4 s
OUTAGE_S = 3.5


def seqs_of(frames: list[dict[str, Any]], sid: str) -> list[int]:
    return [f["seq"] for f in frames if f.get("session_id") == sid and "seq" in f]


Probe = Callable[[httpx.AsyncClient, WsClient, dict[str, str]], Awaitable[Any]]


@dataclass
class Outcome:
    sid: str
    reply_id: str
    ended: dict[str, Any]
    frames: list[dict[str, Any]]
    stored: dict[str, Any]
    during: Any = None
    after: Any = None


async def reply_through_outage(
    server: RunningServer, proxy: TcpProxy, during: Probe | None = None, after: Probe | None = None
) -> Outcome:
    """A reply of :data:`TEXT` that the service behind ``proxy`` leaves for
    :data:`OUTAGE_S`, from a second after its first delta past its end;
    ``during`` runs at the start of the outage, ``after`` once the reply
    has ended."""
    team = await make_team(server.state, "Outage")
    h = team.owner.headers
    async with http_client(server) as http:
        sid = await new_session(http, team.owner)
        ws = await WsClient.connect(server.ws_url, team.owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            reply_id = (await send_message(ws, sid, "m1"))["reply_id"]
            await ws.first(lambda f: f["type"] == "reply.delta")
            await asyncio.sleep(1.0)
            await proxy.cut()
            seen_during = await during(http, ws, h) if during else None
            await asyncio.sleep(OUTAGE_S)
            await proxy.start()
            ended = await reply_finished(ws, reply_id, timeout=60)
            seen_after = await after(http, ws, h) if after else None
        finally:
            await ws.close()
        r = await http.get(f"/chat/sessions/{sid}/messages", headers=h)
    return Outcome(sid, reply_id, ended, ws.seen, r.json()["items"][-1], seen_during, seen_after)


def assert_whole(outcome: Outcome) -> None:
    """Ended as usual, every character once, in deltas and stored."""
    assert outcome.ended["type"] == "reply.completed", outcome.ended
    assert outcome.ended["stop_reason"] == "end_turn"
    assert outcome.ended["message"]["content"] == TEXT
    assert delta_text(outcome.frames, outcome.reply_id) == TEXT
    seqs = seqs_of(outcome.frames, outcome.sid)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    stored = outcome.stored
    assert (stored["id"], stored["status"], stored["content"]) == (
        outcome.reply_id,
        "complete",
        TEXT,
    )


def append_retries() -> float:
    return REGISTRY.get_sample_value("chathub_log_append_retries_total") or 0.0


@pytest.mark.redis
async def test_a_redis_outage_over_a_replys_end_loses_no_text(tmp_path: Path) -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    try:
        llm = scripted(text=TEXT, chunk=4, rate=RATE)
        async with server_on("postgres", tmp_path, redis_url=proxy.url, llm=llm) as server:
            retries = append_retries()
            outcome = await reply_through_outage(server, proxy)
    finally:
        await proxy.stop()
    assert_whole(outcome)
    assert append_retries() > retries  # counted for operators


async def test_a_postgres_outage_over_a_replys_end_is_waited_out(tmp_path: Path) -> None:
    name = await create_pg_database()
    proxy = PgProxy(name)
    await proxy.start()

    async def refused(http: httpx.AsyncClient, ws: WsClient, h: dict[str, str]) -> Any:
        other = (await http.post("/chat/sessions", json={}, headers=h)).json()
        return other, await ws.request({"type": "join", "session_id": "x"})

    async def served(http: httpx.AsyncClient, ws: WsClient, h: dict[str, str]) -> Any:
        return (await http.get("/chat/sessions", headers=h)).status_code, await ws.request(
            {"type": "join", "session_id": "x"}
        )

    try:
        settings = test_settings(proxy.url, tmp_path, llm=scripted(text=TEXT, chunk=4, rate=RATE))
        server = await start_server(settings)
        try:
            outcome = await reply_through_outage(server, proxy, during=refused, after=served)
        finally:
            await server.stop()
    finally:
        await proxy.stop()
        await drop_pg_database(name)
    assert_whole(outcome)
    # Meanwhile: refused as unavailable, on REST and on the socket.
    created, joined = outcome.during
    assert created["status"] == 503 and created["code"] == "unavailable", created
    assert (joined["type"], joined.get("code")) == ("error", "unavailable"), joined
    # And served again once it is back.
    listed, rejoined = outcome.after
    assert listed == 200
    assert (rejoined["type"], rejoined.get("code")) == ("error", "not_found"), rejoined
