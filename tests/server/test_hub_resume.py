"""Fan-out and resume: every joined socket sees the same events, and a client
that reconnects with ``after_seq`` misses nothing and sees nothing twice."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import RunningServer, TeamFixture
from tests.server.test_ws import (
    Served,
    assert_contiguous,
    custom_server,
    delta_text,
    events_of,
    hold_reply_endings,
    new_session,
    reply_finished,
    scripted,
    send_message,
    stored_message,
    wait_finished,
    without_trace,
)
from tests.wsclient import WsClient, reply_end

TEXT = "".join(f"piece{i:02d}|" for i in range(40))  # 320 characters, 40 chunks of 8


async def test_two_sockets_on_one_session_see_identical_event_sequences(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    member = await team.actor("member")
    a = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    b = await WsClient.connect(clean_server.ws_url, member.api_key)
    try:
        for ws in (a, b):
            assert (await ws.request({"type": "join", "session_id": sid}))["type"] == "ack"
        first = await send_message(a, sid, "a1", "from a")
        await reply_finished(a, first["reply_id"])
        await reply_finished(b, first["reply_id"])
        second = await send_message(b, sid, "b1", "from b")
        await reply_finished(a, second["reply_id"])
        await reply_finished(b, second["reply_id"])
    finally:
        await a.close()
        await b.close()
    seen_a, seen_b = events_of(a.seen, sid), events_of(b.seen, sid)
    assert seen_a == seen_b
    assert_contiguous(seen_a, first=1)
    assert [e["type"] for e in seen_a].count("reply.completed") == 2
    # only the sender gets the ack of its message.send
    assert sum(f["type"] == "ack" and "message_id" in f for f in a.seen) == 1
    assert sum(f["type"] == "ack" and "message_id" in f for f in b.seen) == 1


async def test_sessions_are_kept_apart(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    one, two = await new_session(client, team.owner), await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    other = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        await ws.request({"type": "join", "session_id": one})
        await other.request({"type": "join", "session_id": two})
        ack = await send_message(other, two, "c1")
        await reply_finished(other, ack["reply_id"])
        await ws.request({"type": "ping"})
        assert events_of(ws.seen) == []
        assert {e["session_id"] for e in events_of(other.seen)} == {two}
    finally:
        await ws.close()
        await other.close()


async def _turn_with_disconnect(s: Served, stop_after: int, abrupt: bool) -> None:
    """Send on one socket, drop it after ``stop_after`` session events, rejoin
    on a new one with ``after_seq`` = the last seq seen; check the whole reply."""
    owner = s.team.owner
    sid = await new_session(s.client, owner)
    first = await WsClient.connect(s.server.ws_url, owner.api_key)
    await first.request({"type": "join", "session_id": sid})
    ack = await send_message(first, sid, "c1")
    reply_id = ack["reply_id"]
    before: list[dict[str, Any]] = events_of(first.seen)
    while len(before) < stop_after:
        frame = await first.recv()
        if "seq" in frame:
            before.append(frame)
    if abrupt:
        first.conn.transport.abort()
    else:
        await first.close()
    last_seen = before[-1]["seq"] if before else 0

    second = await WsClient.connect(s.server.ws_url, owner.api_key)
    try:
        resumed = await second.request({"type": "join", "session_id": sid, "after_seq": last_seen})
        assert resumed["type"] == "ack" and resumed["recovered"] is True, resumed
        assert resumed["last_seq"] >= last_seen
        if not any(reply_end(reply_id)(e) for e in before):
            await reply_finished(second, reply_id)
        await second.request({"type": "ping"})
    finally:
        await second.close()
    after = events_of(second.seen)
    everything = before + after
    assert_contiguous(everything, first=1)
    assert everything[0]["type"] == "message.created"
    assert reply_end(reply_id)(everything[-1]) and everything[-1]["type"] == "reply.completed"
    text = delta_text(everything, reply_id)
    assert text == TEXT == everything[-1]["message"]["content"]
    stored = await wait_finished(s.client, owner, sid, reply_id)
    assert stored["content"] == text


@pytest.mark.parametrize("abrupt", [False, True], ids=["close", "abort"])
async def test_reconnect_with_after_seq_misses_and_repeats_nothing(
    tmp_path: Path, abrupt: bool
) -> None:
    async with custom_server(
        tmp_path, llm=scripted(text=TEXT, chunk=8, rate=200), coalesce_ms=0
    ) as s:
        # 0: before any event; 1: after message.created; 2: after reply.started;
        # then mid-reply, and after the last event (43 = 2 + 40 deltas + completed)
        for stop_after in (0, 1, 2, 3, 10, 25, 42, 43):
            await _turn_with_disconnect(s, stop_after, abrupt)


async def test_join_after_seq_older_than_the_log_is_not_recovered(tmp_path: Path) -> None:
    # words end each chunk, so the output guardrail holds nothing back
    llm = scripted(text="a b c d e f g h i j ", chunk=2)
    async with custom_server(tmp_path, llm=llm, coalesce_ms=0, session_log_length=5) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            done = await reply_finished(ws, ack["reply_id"])
        finally:
            await ws.close()
        last = done["seq"]
        assert last == 13  # created, started, 10 deltas, completed: more than the log holds

        late = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            # the log holds the last five events (9..13): after 7, seq 8 is gone
            for after_seq in (0, 1, last - 6):
                lost = await late.request(
                    {"type": "join", "session_id": sid, "after_seq": after_seq}
                )
                assert lost["type"] == "ack" and lost["recovered"] is False, (after_seq, lost)
                assert lost["last_seq"] == last
            # beyond the end: not something the server can vouch for either
            ahead = await late.request({"type": "join", "session_id": sid, "after_seq": last + 10})
            assert ahead["type"] == "ack" and ahead["recovered"] is False, ahead
            # still in the window: replayed
            kept = await late.request({"type": "join", "session_id": sid, "after_seq": last - 3})
            assert kept["recovered"] is True, kept
            await late.request({"type": "ping"})
            replayed = events_of(late.seen)
            assert [e["seq"] for e in replayed] == [last - 2, last - 1, last]
            assert replayed[-1] == done
            # not recovered means: reload over REST, then go on live
            stored = await stored_message(s.client, owner, sid, ack["reply_id"])
            assert without_trace(stored) == done["message"]
            ack2 = await send_message(late, sid, "c2")
            more = events_of(await late.until(reply_end(ack2["reply_id"])))
            assert_contiguous(more, first=last + 1)
        finally:
            await late.close()


async def test_a_join_while_a_reply_is_being_ended_leaves_no_gap(tmp_path: Path) -> None:
    """A reply stores the seq of its ending event with its text, then appends
    the event. A socket that joins in between reads that seq from the
    database before the log has handed it out; that must not move the log
    past it (the ending would come one seq later, after a gap, and the
    window would be dropped)."""
    async with custom_server(tmp_path, llm=scripted(text="a b c d ", chunk=2)) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ending_stored, go_on = hold_reply_endings(s.server.state.session_log)
        a = await WsClient.connect(s.server.ws_url, owner.api_key)
        b = await WsClient.connect(s.server.ws_url, owner.api_key)
        c = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await a.request({"type": "join", "session_id": sid})
            ack = await send_message(a, sid, "c1")
            await asyncio.wait_for(ending_stored.wait(), 10)
            stored = (await s.client.get(f"/chat/sessions/{sid}", headers=owner.headers)).json()
            joined = await b.request({"type": "join", "session_id": sid})
            resumed = await c.request({"type": "join", "session_id": sid, "after_seq": 0})
            go_on.set()
            done = await reply_finished(a, ack["reply_id"], timeout=5)
            assert (await reply_finished(b, ack["reply_id"], timeout=5)) == done
            assert (await reply_finished(c, ack["reply_id"], timeout=5)) == done
        finally:
            for ws in (a, b, c):
                await ws.close()
        assert done["seq"] == stored["last_seq"]  # the seq stored before it was sent
        assert joined["last_seq"] == done["seq"] - 1, joined
        assert resumed["recovered"] is True, resumed
        assert_contiguous(events_of(a.seen, sid), first=1)
        assert_contiguous(events_of(c.seen, sid), first=1)
        assert [e["seq"] for e in events_of(b.seen, sid)] == [done["seq"]]
        assert not [f for ws in (a, b, c) for f in ws.seen if f["type"] == "resync"]
