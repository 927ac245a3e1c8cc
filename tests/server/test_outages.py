"""A reply streaming while Redis or PostgreSQL goes away for a few seconds,
over its end: it ends once the service is back, with every character the
model wrote, once; what the service's outage refuses meanwhile is refused
as ``unavailable`` (503), never as an internal error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.harness import (
    REDIS_URL,
    create_pg_database,
    drop_pg_database,
    http_client,
    make_team,
    server_on,
    start_server,
    test_settings,
)
from tests.proxy import PgProxy, RedisProxy
from tests.server.test_ws import delta_text, new_session, reply_finished, scripted, send_message
from tests.wsclient import WsClient

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

TEXT = "".join(f"word{i:03d} " for i in range(100))  # 800 characters
RATE = 50  # chunks of 4 characters per second: the reply takes 4 s
OUTAGE_S = 3.5


def seqs_of(frames: list[dict[str, Any]], sid: str) -> list[int]:
    return [f["seq"] for f in frames if f.get("session_id") == sid and "seq" in f]


@pytest.mark.redis
async def test_a_redis_outage_over_a_replys_end_loses_no_text(tmp_path: Path) -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    try:
        llm = scripted(text=TEXT, chunk=4, rate=RATE)
        async with server_on("postgres", tmp_path, redis_url=proxy.url, llm=llm) as server:
            team = await make_team(server.state, "Outage")
            async with http_client(server) as http:
                sid = await new_session(http, team.owner)
                ws = await WsClient.connect(server.ws_url, team.owner.api_key)
                try:
                    await ws.request({"type": "join", "session_id": sid})
                    ack = await send_message(ws, sid, "m1")
                    reply_id = ack["reply_id"]
                    await ws.first(lambda f: f["type"] == "reply.delta")
                    await asyncio.sleep(1.0)
                    retries = REGISTRY.get_sample_value("chathub_log_append_retries_total")
                    await proxy.cut()  # from the middle of the reply past its end
                    await asyncio.sleep(OUTAGE_S)
                    await proxy.start()
                    ended = await reply_finished(ws, reply_id, timeout=60)
                    retried = REGISTRY.get_sample_value("chathub_log_append_retries_total")
                finally:
                    await ws.close()
                r = await http.get(f"/chat/sessions/{sid}/messages", headers=team.owner.headers)
    finally:
        await proxy.stop()
    assert ended["type"] == "reply.completed", ended
    assert ended["stop_reason"] == "end_turn"
    assert (retried or 0) > (retries or 0)  # counted for operators
    assert ended["message"]["content"] == TEXT
    assert delta_text(ws.seen, reply_id) == TEXT
    seqs = seqs_of(ws.seen, sid)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    stored = r.json()["items"][-1]
    assert (stored["id"], stored["status"], stored["content"]) == (reply_id, "complete", TEXT)


async def test_a_postgres_outage_over_a_replys_end_is_waited_out(tmp_path: Path) -> None:
    name = await create_pg_database()
    proxy = PgProxy(name)
    await proxy.start()
    try:
        settings = test_settings(proxy.url, tmp_path, llm=scripted(text=TEXT, chunk=4, rate=RATE))
        server = await start_server(settings)
        try:
            team = await make_team(server.state, "Outage")
            h = team.owner.headers
            async with http_client(server) as http:
                sid = await new_session(http, team.owner)
                other = await new_session(http, team.owner)
                ws = await WsClient.connect(server.ws_url, team.owner.api_key)
                try:
                    await ws.request({"type": "join", "session_id": sid})
                    ack = await send_message(ws, sid, "m1")
                    reply_id = ack["reply_id"]
                    await ws.first(lambda f: f["type"] == "reply.delta")
                    await asyncio.sleep(1.0)
                    await proxy.cut()
                    # Meanwhile: refused as unavailable, on REST and on the socket.
                    listed = await http.get("/chat/sessions", headers=h)
                    joined = await ws.request({"type": "join", "session_id": other})
                    await asyncio.sleep(OUTAGE_S)
                    await proxy.start()
                    ended = await reply_finished(ws, reply_id, timeout=60)
                    # And served again once it is back.
                    assert (await http.get("/chat/sessions", headers=h)).status_code == 200
                    rejoined = await ws.request({"type": "join", "session_id": other})
                finally:
                    await ws.close()
                r = await http.get(f"/chat/sessions/{sid}/messages", headers=h)
        finally:
            await server.stop()
    finally:
        await proxy.stop()
        await drop_pg_database(name)
    assert listed.status_code == 503, listed.text
    assert listed.headers["content-type"] == "application/problem+json"
    assert listed.json()["code"] == "unavailable"
    assert (joined["type"], joined.get("code")) == ("error", "unavailable"), joined
    assert rejoined["type"] == "ack", rejoined
    assert ended["type"] == "reply.completed", ended
    assert ended["message"]["content"] == TEXT == delta_text(ws.seen, reply_id)
    stored = r.json()["items"][-1]
    assert (stored["id"], stored["status"], stored["content"]) == (reply_id, "complete", TEXT)
