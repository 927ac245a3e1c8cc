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


async def test_post_message_sse_and_json(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    events = []
    async with client.stream(
        "POST",
        f"/chat/sessions/{sid}/messages",
        json={"content": "stream me", "client_msg_id": "a1"},
        headers=h | {"accept": "text/event-stream"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        import json

        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    types = [e["type"] for e in events]
    assert types[0] == "message.created" and types[-1] == "reply.completed"
    text = "".join(e["text"] for e in events if e["type"] == "reply.delta")
    assert text and events[-1]["message"]["content"] == text

    # text/event-stream refused (q=0), or not asked for: the finished turn as JSON
    for accept in ("text/event-stream;q=0, application/json", "*/*"):
        r = await client.post(
            f"/chat/sessions/{sid}/messages",
            json={"content": "json please"},
            headers=h | {"accept": accept},
        )
        assert r.status_code == 201, (accept, r.text)
        assert r.headers["content-type"] == "application/json", accept

    r = await client.post(f"/chat/sessions/{sid}/messages", json={"content": "now json"}, headers=h)
    assert r.status_code == 201, r.text
    turn = r.json()
    assert turn["reply"]["status"] == "complete" and turn["reply"]["content"]
    again = await client.post(
        f"/chat/sessions/{sid}/messages",
        json={"content": "stream me", "client_msg_id": "a1"},
        headers=h,
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["reply"]["content"] == text
