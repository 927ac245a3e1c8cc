"""The embedded server (SQLite, in-process log and bus) killed mid-reply
(SIGKILL) and started again: the reply ends as interrupted with the text of
its last checkpoint, and no seq the dead process handed out is handed out
again. A real ``python -m chathub serve`` process, a real socket."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.scaleout.conftest import (
    FULL_TEXT,
    Instance,
    chathub_env,
    connect_to,
    count_deltas,
    deltas,
    events,
    join,
    reap,
    run_cli,
    scripted_llm,
    send,
    spawn_serve,
)
from tests.wsclient import reply_end

pytestmark = pytest.mark.timeout(90)


def embedded_env(tmp: Path) -> dict[str, str]:
    return chathub_env(
        f"sqlite+aiosqlite:///{tmp / 'chathub.db'}",
        tmp / "data",
        redis_url="",
        reply_checkpoint_s=0.2,
        session_log_length=500,
    )


def bootstrap(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """A team with its owner's API key, as ``chathub admin bootstrap`` prints it."""
    out = run_cli(
        ["admin", "bootstrap", "--team", "Solo", "--email", "owner@solo.example"], env, tmp
    )
    created: dict[str, str] = json.loads(out.splitlines()[-1])
    return created


async def start(tmp: Path, env: dict[str, str], name: str) -> Instance:
    instance = spawn_serve(name, env, tmp / f"{name}.log", tmp)
    await instance.wait_ready()
    return instance


async def test_a_killed_embedded_server_keeps_the_checkpointed_text(tmp_path: Path) -> None:
    env = embedded_env(tmp_path)
    run_cli(["db", "upgrade"], env, tmp_path)
    created = bootstrap(env, tmp_path)
    headers = {"Authorization": f"Bearer {created['api_key']}"}

    first = await start(tmp_path, env, "first")
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=15) as http:
            session_id = (await http.post("/chat/sessions", json={}, headers=headers)).json()["id"]
        ws = await connect_to(first, created["api_key"])
        await join(ws, session_id)
        reply_id = await send(ws, session_id, "m1")
        # 30 of 100 deltas (0.75 s at 40 a second): a few checkpoints stored.
        await count_deltas(ws, reply_id, 30)
        first.kill9()
        seen = deltas(ws.seen, reply_id)
        last_seen = max(e["seq"] for e in events(ws.seen, session_id))
        await ws.close()
    finally:
        await reap(first.proc)

    second = await start(tmp_path, env, "second")
    try:
        async with httpx.AsyncClient(base_url=second.url, timeout=15) as http:
            r = await http.get(f"/chat/sessions/{session_id}/messages", headers=headers)
            (reply,) = [m for m in r.json()["items"] if m["id"] == reply_id]
        # Ended before the server took a request, with the last checkpoint:
        # some of what was streamed, never more.
        assert reply["status"] == "failed" and reply["stop_reason"] == "error"
        assert reply["content"] and seen.startswith(reply["content"]), (reply, seen)
        assert FULL_TEXT.startswith(seen) and seen != FULL_TEXT

        ws = await connect_to(second, created["api_key"])
        try:
            ack = await join(ws, session_id, after_seq=last_seen)
            # The seqs the dead process gave out are not given out again:
            # the client is told to reload, and new events come after them.
            assert ack["recovered"] is False, ack
            assert ack["last_seq"] > last_seen, ack
            next_id = await send(ws, session_id, "m2")
            frames = await ws.until(reply_end(next_id), timeout=15)
            assert frames[-1]["type"] == "reply.completed"
            assert deltas(frames, next_id) == FULL_TEXT
            new_seqs = [e["seq"] for e in events(ws.seen, session_id)]
            assert new_seqs == list(range(ack["last_seq"] + 1, ack["last_seq"] + 1 + len(new_seqs)))
        finally:
            await ws.close()
    finally:
        await reap(second.proc)


async def test_a_stopped_server_ends_the_reply_on_the_socket_before_closing_it(
    tmp_path: Path,
) -> None:
    """SIGTERM mid-reply: the socket receives the reply's ending
    (``reply.failed``, ``interrupted``, with the text streamed so far) and
    only then the close, 1012."""
    env = embedded_env(tmp_path)
    created = bootstrap(env, tmp_path)
    server = await start(tmp_path, env, "stopped")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            session_id = (
                await http.post(
                    "/chat/sessions",
                    json={},
                    headers={"Authorization": f"Bearer {created['api_key']}"},
                )
            ).json()["id"]
        ws = await connect_to(server, created["api_key"])
        await join(ws, session_id)
        reply_id = await send(ws, session_id, "m1")
        await count_deltas(ws, reply_id, 10)
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await ws.until(lambda _frame: False, timeout=20)
        code = ws.conn.close_code
    finally:
        await reap(server.proc)
    (ended,) = [f for f in ws.seen if f.get("type") in ("reply.completed", "reply.failed")]
    assert ended["type"] == "reply.failed" and ended["code"] == "interrupted", ended
    assert ended["partial"]["content"] == deltas(ws.seen, reply_id)
    assert code == 1012


async def test_a_stopped_server_ends_a_streaming_sse_reply_before_closing_it(
    tmp_path: Path,
) -> None:
    """SIGTERM while a reply streams as server-sent events, with no socket
    open: the stream receives the reply's ending (``reply.failed``,
    ``interrupted``, with the text streamed so far) and completes, and the
    server exits. The reply is slow (20 s), longer than uvicorn's graceful
    shutdown wait, which would otherwise cut the stream with no ending."""
    env = embedded_env(tmp_path) | {"CHATHUB_LLM": scripted_llm(rate=5)}
    created = bootstrap(env, tmp_path)
    server = await start(tmp_path, env, "stopped-sse")
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    frames: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            session_id = (await http.post("/chat/sessions", json={}, headers=headers)).json()["id"]
            async with http.stream(
                "POST",
                f"/chat/sessions/{session_id}/messages",
                json={"content": "hello", "client_msg_id": "m1"},
                headers=headers | {"accept": "text/event-stream"},
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    frames.append(json.loads(line[6:]))
                    if sum(f["type"] == "reply.delta" for f in frames) == 3:
                        server.proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(server.proc.wait, 30)
    finally:
        await reap(server.proc)
    ended = frames[-1]
    assert ended["type"] == "reply.failed" and ended["code"] == "interrupted", ended
    assert ended["partial"]["content"] == deltas(frames, ended["reply_id"])
    assert exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it stopped on
    assert "graceful shutdown exceeded" not in server.log.read_text()
