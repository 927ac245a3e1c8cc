"""Replies never end silently, and what they streamed is kept: a streaming
reply stores its text so far now and then (a checkpoint); one left streaming
by a server that died is ended as interrupted with the text the session log
still holds, or else its last checkpoint, and the seqs the dead server handed
out are never handed out again."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from chathub.llm.base import estimate_tokens
from chathub.server.reaper import ReplyReaper, streamed_text
from chathub.server.session_log import Event
from chathub.storage.db import transaction
from chathub.storage.models import ChatSession, Message
from chathub.storage.repositories import sessions as sessions_repo
from tests.harness import (
    RunningServer,
    make_team,
    server_on,
    start_server,
    test_settings,
)
from tests.server.test_ws import (
    delta_text,
    new_session,
    scripted,
    send_message,
    stored_message,
    wait_finished,
)
from tests.wsclient import WsClient, reply_end

SLOW_TEXT = "".join(f"word{i:03d} " for i in range(80))  # 640 characters, 160 chunks, 4 s


async def stored_last_seq(server: RunningServer, session_id: str) -> int:
    async with server.state.sessionmaker() as db:
        return await sessions_repo.stored_last_seq(db, session_id=session_id)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_streaming_reply_stores_its_text_so_far(backend: str, tmp_path: Path) -> None:
    llm = scripted(text=SLOW_TEXT, chunk=4, rate=40)
    async with server_on(
        backend, tmp_path, llm=llm, coalesce_ms=0, reply_checkpoint_s=0.2
    ) as server:
        team = await make_team(server.state)
        owner = team.owner
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = await new_session(client, owner)
            ws = await WsClient.connect(server.ws_url, owner.api_key)
            try:
                await ws.request({"type": "join", "session_id": sid})
                ack = await send_message(ws, sid, "c1")
                reply_id = ack["reply_id"]
                checkpoints: list[str] = []
                while len(checkpoints) < 3:
                    reply = await stored_message(client, owner, sid, reply_id)
                    assert reply["status"] == "streaming", reply
                    if reply["content"] and reply["content"] not in checkpoints:
                        checkpoints.append(reply["content"])
                        # Stored with it (or with a later one, read a moment
                        # later): the seq of its last delta, as the session's.
                        last_seq = await stored_last_seq(server, sid)
                        if not any(f.get("seq") == last_seq for f in ws.seen):
                            await ws.until(lambda f, s=last_seq: f.get("seq") == s, timeout=5)
                        (at,) = [f for f in ws.seen if f.get("seq") == last_seq]
                        assert at["type"] == "reply.delta", at
                        up_to = [f for f in ws.seen if "seq" in f and f["seq"] <= last_seq]
                        assert delta_text(up_to, reply_id).startswith(reply["content"])
                    await asyncio.sleep(0.05)
                end = (await ws.until(reply_end(reply_id)))[-1]
            finally:
                await ws.close()
        # Each checkpoint is what had been streamed by then: a prefix of the
        # reply, longer than the one before.
        for before, after in itertools.pairwise(checkpoints):
            assert after.startswith(before) and len(after) > len(before)
        assert all(SLOW_TEXT.startswith(c) and c != SLOW_TEXT for c in checkpoints)
        # and the end stores the whole text, not a late checkpoint's
        assert end["type"] == "reply.completed"
        assert end["message"]["content"] == delta_text(ws.seen, reply_id) == SLOW_TEXT
        async with httpx.AsyncClient(base_url=server.url) as client:
            await asyncio.sleep(0.5)  # two more checkpoint periods
            stored = await wait_finished(client, owner, sid, reply_id)
        assert stored["content"] == SLOW_TEXT and stored["status"] == "complete"


async def test_with_checkpoints_off_a_streaming_reply_shows_no_text(tmp_path: Path) -> None:
    llm = scripted(text=SLOW_TEXT, chunk=4, rate=40)
    async with server_on(
        "sqlite", tmp_path, llm=llm, coalesce_ms=0, reply_checkpoint_s=0
    ) as server:
        owner = (await make_team(server.state)).owner
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = await new_session(client, owner)
            ws = await WsClient.connect(server.ws_url, owner.api_key)
            try:
                await ws.request({"type": "join", "session_id": sid})
                reply_id = (await send_message(ws, sid, "c1"))["reply_id"]
                for _ in range(10):
                    await ws.until(lambda f: f["type"] == "reply.delta")
                await asyncio.sleep(0.5)
                reply = await stored_message(client, owner, sid, reply_id)
                assert reply["status"] == "streaming" and reply["content"] == ""
                await ws.request({"type": "reply.cancel", "reply_id": reply_id})
                await ws.until(reply_end(reply_id))
            finally:
                await ws.close()


async def test_a_reply_left_streaming_is_ended_with_its_checkpoint_at_the_next_start(
    tmp_path: Path,
) -> None:
    log_length = 100
    settings = test_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", tmp_path, session_log_length=log_length
    )
    first = await start_server(settings)
    team = await make_team(first.state)
    h = team.owner.headers
    async with httpx.AsyncClient(base_url=first.url) as client:
        sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    # What a crash mid-reply leaves behind: the reply's row, still streaming,
    # with its last checkpoint, and that checkpoint's seq as the session's.
    reply_id = "0" * 8 + "-dead-7000-8000-000000000000"
    async with transaction(first.state.sessionmaker) as db:
        db.add(
            Message(
                id=reply_id,
                team_id=team.team_id,
                session_id=sid,
                role="assistant",
                content="Hello, wor",
                status="streaming",
            )
        )
        await db.execute(update(ChatSession).where(ChatSession.id == sid).values(last_seq=40))
    await first.stop()

    second = await start_server(settings)
    try:
        async with httpx.AsyncClient(base_url=second.url) as client:
            # Ended before the server took any request.
            reply = await stored_message(client, team.owner, sid, reply_id)
            assert reply["status"] == "failed" and reply["stop_reason"] == "error"
            assert reply["content"] == "Hello, wor"

            # The dead server may have handed out seqs past 40 (deltas after
            # its checkpoint): none of them comes again, and a client that
            # saw some is told to reload.
            ws = await WsClient.connect(second.ws_url, team.owner.api_key)
            try:
                ack = await ws.request({"type": "join", "session_id": sid, "after_seq": 45})
                assert ack["recovered"] is False, ack
                assert ack["last_seq"] == 40 + log_length + 1, ack
                # the session takes new messages, numbered from there
                sent = await send_message(ws, sid, "c2")
                frames = await ws.until(reply_end(sent["reply_id"]))
                assert frames[-1]["type"] == "reply.completed"
                seqs = [f["seq"] for f in ws.seen if "seq" in f and f.get("session_id") == sid]
                assert seqs == list(range(ack["last_seq"] + 1, ack["last_seq"] + 1 + len(seqs)))
            finally:
                await ws.close()
    finally:
        await second.stop()


# -- the usage of a reaped reply ---------------------------------------------


async def test_a_reaped_reply_stores_an_estimated_usage_of_its_partial_text(
    tmp_path: Path,
) -> None:
    """As every reply the provider's count never reached: output from the
    partial text, input from the message it answers (all of the prompt the
    reaper can know), marked estimated."""
    llm = scripted(text=SLOW_TEXT, chunk=4, rate=40)
    async with server_on("sqlite", tmp_path, llm=llm, coalesce_ms=0) as server:
        team = await make_team(server.state)
        owner = team.owner
        # Another instance's reaper, for which this reply's instance died.
        reaper = ReplyReaper(
            settings=server.settings,
            sessionmaker=server.state.sessionmaker,
            session_log=server.state.session_log,
            leases=server.state.replies.leases,
            is_local=lambda _reply_id: False,
            session_feed=server.state.session_feed,
        )
        asked = "what is the plan for the quarter?"
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = await new_session(client, owner)
            ws = await WsClient.connect(server.ws_url, owner.api_key)
            try:
                await ws.request({"type": "join", "session_id": sid})
                await ws.request({"type": "subscribe", "channel": "sessions"})
                reply_id = (await send_message(ws, sid, "c1", asked))["reply_id"]
                for _ in range(5):
                    await ws.until(lambda f: f["type"] == "reply.delta")
                assert await reaper.end_interrupted(reply_id)
                end = await ws.first(reply_end(reply_id))
                activity = await ws.first(
                    lambda f: f["type"] == "session.activity" and f["last_seq"] == end["seq"]
                )
                await ws.request({"type": "reply.cancel", "reply_id": reply_id})
            finally:
                await ws.close()
            stored = await stored_message(client, owner, sid, reply_id)
            session = (await client.get(f"/chat/sessions/{sid}", headers=owner.headers)).json()
    assert end["type"] == "reply.failed" and end["code"] == "interrupted", end
    # The session moved on, as with any reply's end.
    assert activity["last_message_at"] == end["partial"]["completed_at"]
    assert session["last_message_at"] == end["partial"]["completed_at"]
    assert session["last_seq"] >= end["seq"]
    partial = end["partial"]["content"]
    assert partial and SLOW_TEXT.startswith(partial)
    usage = {
        "input_tokens": estimate_tokens(asked),
        "output_tokens": estimate_tokens(partial),
        "estimated": True,
    }
    assert end["partial"]["usage"] == usage
    assert stored["status"] == "failed" and stored["usage"] == usage


async def test_a_reply_ended_from_its_checkpoint_stores_an_estimated_usage(
    tmp_path: Path,
) -> None:
    settings = test_settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", tmp_path)
    first = await start_server(settings)
    team = await make_team(first.state)
    async with httpx.AsyncClient(base_url=first.url) as client:
        sid = await new_session(client, team.owner)
    # A crash mid-reply: the message, and its reply left streaming.
    asked, reply_id = "x" * 41, "0" * 8 + "-dead-7000-8000-000000000001"
    async with transaction(first.state.sessionmaker) as db:
        await sessions_repo.add_turn(
            db,
            team_id=team.team_id,
            session_id=sid,
            content=asked,
            client_msg_id="c1",
            author_id=team.owner.member_id,
            mode="chat",
            model="scripted",
            file_ids=None,
            message_id="0" * 8 + "-dead-7000-8000-000000000000",
            reply_id=reply_id,
        )
        await sessions_repo.checkpoint_reply(db, message_id=reply_id, content="Hello, wor")
    await first.stop()

    second = await start_server(settings)
    try:
        async with httpx.AsyncClient(base_url=second.url) as client:
            reply = await stored_message(client, team.owner, sid, reply_id)
    finally:
        await second.stop()
    assert reply["status"] == "failed" and reply["content"] == "Hello, wor"
    assert reply["usage"] == {"input_tokens": 11, "output_tokens": 3, "estimated": True}


# -- what the log still holds ------------------------------------------------

R = "reply-1"


def ev(seq: int, type_: str, **data: Any) -> Event:
    return Event.build("s", seq, type_, data)


def whole_reply(first: int = 5) -> list[Event]:
    return [
        ev(first, "message.created", message={"id": "m"}),
        ev(first + 1, "reply.started", reply_id=R),
        ev(first + 2, "reply.delta", reply_id=R, text="Hel"),
        ev(first + 3, "reply.guardrail", reply_id=R, action="redact", rule="email"),
        ev(first + 4, "reply.delta", reply_id=R, text="lo"),
    ]


def test_streamed_text_is_the_reply_s_deltas_from_its_start() -> None:
    earlier = [
        ev(1, "reply.started", reply_id="old"),
        ev(2, "reply.delta", reply_id="old", text="x"),
        ev(3, "reply.completed", reply_id="old"),
    ]
    assert streamed_text([*earlier, *whole_reply(4)], R) == "Hello"
    assert streamed_text(whole_reply(), R) == "Hello"
    assert streamed_text(whole_reply()[:2], R) == ""


def test_streamed_text_is_unknown_without_the_reply_s_start_or_with_a_gap() -> None:
    events = whole_reply()
    assert streamed_text(events[2:], R) is None  # its start was trimmed
    assert streamed_text([*events[:3], *events[4:]], R) is None  # a seq is missing
    assert streamed_text([], R) is None
    assert streamed_text(events, "another-reply") is None
