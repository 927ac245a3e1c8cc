from __future__ import annotations

import httpx

from tests.harness import RunningServer, TeamFixture
from tests.wsclient import WsClient, reply_end


async def test_full_turn(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    s = await client.post("/chat/sessions", json={"title": "t"}, headers=team.owner.headers)
    sid = s.json()["id"]
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    assert ws.welcome["protocol"] == 1
    ack = await ws.request({"type": "join", "session_id": sid})
    assert ack["type"] == "ack", ack
    ack = await ws.request(
        {"type": "message.send", "session_id": sid, "client_msg_id": "c1", "content": "hello there"}
    )
    assert ack["type"] == "ack", ack
    frames = await ws.until(reply_end(ack["reply_id"]))
    frames = ws.seen
    types = [f["type"] for f in frames]
    assert "message.created" in types and "reply.started" in types
    deltas = "".join(f["text"] for f in frames if f["type"] == "reply.delta")
    done = frames[-1]
    assert done["type"] == "reply.completed", done
    assert done["message"]["content"] == deltas
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    await ws.close()
