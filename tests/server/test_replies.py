"""Replies over the socket: the full turn, idempotent sends, one reply at a
time, cancelling, provider failures and delta coalescing. Real server, real
sockets, the deterministic ``scripted://`` provider."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from chathub.auth import Principal
from chathub.server.leases import MemoryReplyLeases
from chathub.server.replies import Replies
from chathub.server.session_log import LogUnavailable
from chathub.storage.db import transaction
from chathub.storage.repositories import sessions as sessions_repo
from tests.harness import (
    RunningServer,
    TeamFixture,
    make_team,
    server_on,
)
from tests.server.test_ws import (
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
    stored_messages,
    wait_finished,
    without_trace,
)
from tests.wsclient import WsClient, reply_end

SLOW_TEXT = "".join(f"word{i:03d} " for i in range(60))  # 480 characters


async def test_full_turn(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        joined = await ws.request({"type": "join", "session_id": sid})
        assert joined["type"] == "ack" and joined["session_id"] == sid, joined
        assert joined["last_seq"] == 0

        await ws.send(
            {
                "type": "message.send",
                "id": "send-1",
                "session_id": sid,
                "client_msg_id": "c1",
                "content": "hello there",
            }
        )
        frames = await ws.until(reply_end())
    finally:
        await ws.close()

    ack, events = frames[0], frames[1:]
    # the direct answer comes first, then the session's events
    assert ack["type"] == "ack" and ack["id"] == "send-1", frames[:3]
    assert ack["session_id"] == sid and ack["duplicate"] is False
    message_id, reply_id = ack["message_id"], ack["reply_id"]
    assert message_id and reply_id and message_id != reply_id

    assert all("seq" in e and e["session_id"] == sid for e in events), events
    assert_contiguous(events, first=joined["last_seq"] + 1)
    types = [e["type"] for e in events]
    assert types[:2] == ["message.created", "reply.started"], types
    assert types[-1] == "reply.completed", types
    assert set(types[2:-1]) == {"reply.delta"}, types

    created = events[0]["message"]
    assert created["id"] == message_id and created["session_id"] == sid
    assert created["role"] == "user" and created["content"] == "hello there"
    assert created["client_msg_id"] == "c1" and created["created_at"]

    started = events[1]
    assert started["reply_id"] == reply_id and started["message_id"] == message_id
    assert started["mode"] == "chat" and started["model"] == "scripted"

    done = events[-1]
    text = delta_text(events, reply_id)
    assert text == "You said: hello there"
    assert done["reply_id"] == reply_id and done["stop_reason"] == "end_turn"
    assert done["message"]["id"] == reply_id and done["message"]["role"] == "assistant"
    assert done["message"]["content"] == text and done["message"]["status"] == "complete"
    assert done["usage"]["output_tokens"] == 6  # ceil(21 / 4)
    assert done["usage"]["input_tokens"] > 0
    assert "estimated" not in done["usage"]  # the provider's own count

    # REST shows the same objects the socket did
    stored = await stored_messages(client, team.owner, sid)
    assert [m["id"] for m in stored] == [message_id, reply_id]
    assert without_trace(stored[0]) == created
    assert without_trace(stored[1]) == done["message"]
    assert stored[1]["usage"] == done["usage"] and stored[1]["reply_to"] == message_id
    # the session's last_seq was stored with the reply, before its last event
    r = await client.get(f"/chat/sessions/{sid}", headers=team.owner.headers)
    assert r.json()["last_seq"] == done["seq"]

    # a second turn goes on from the same seq
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        rejoined = await ws.request({"type": "join", "session_id": sid})
        assert rejoined["last_seq"] == done["seq"]
        ack2 = await send_message(ws, sid, "c2", "again")
        more = events_of(await ws.until(reply_end(ack2["reply_id"])))
        assert_contiguous(more, first=done["seq"] + 1)
        assert more[-1]["message"]["content"] == "You said: again"
    finally:
        await ws.close()


async def test_resend_of_the_same_client_msg_id_gets_the_same_ack_and_no_second_reply(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        await ws.request({"type": "join", "session_id": sid})
        first = await send_message(ws, sid, "same", "hi")
        at_once = await send_message(ws, sid, "same", "hi")  # a retry while replying
        await reply_finished(ws, first["reply_id"])
        later = await send_message(ws, sid, "same", "hi")  # a retry after the reply
        reused = await send_message(ws, sid, "same", "another message")
        await ws.request({"type": "ping"})
    finally:
        await ws.close()

    assert first["type"] == "ack" and first["duplicate"] is False, first
    assert reused["type"] == "error" and reused["code"] == "conflict", reused
    for dup in (at_once, later):
        assert dup["type"] == "ack", dup
        assert dup["duplicate"] is True
        assert (dup["message_id"], dup["reply_id"]) == (first["message_id"], first["reply_id"])
    types = [f["type"] for f in ws.seen]
    assert types.count("reply.started") == 1 and types.count("message.created") == 1, types
    assert types.count("reply.completed") == 1
    stored = await stored_messages(client, team.owner, sid)
    assert [m["role"] for m in stored] == ["user", "assistant"]


async def test_next_message_sent_as_soon_as_the_reply_ends_is_accepted(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    """A client that sees ``reply.completed`` may send its next message at
    once; the session must be free by then."""
    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        await ws.request({"type": "join", "session_id": sid})
        for turn in range(15):
            ack = await send_message(ws, sid, f"c{turn}", f"turn {turn}")
            assert ack["type"] == "ack", (turn, ack)
            done = await reply_finished(ws, ack["reply_id"])
            assert done["type"] == "reply.completed", done
    finally:
        await ws.close()
    assert_contiguous(events_of(ws.seen), first=1)
    assert len(await stored_messages(client, team.owner, sid)) == 30


async def test_second_send_while_a_reply_runs_is_a_conflict_not_queued(tmp_path: Path) -> None:
    """The contract lets a server queue or refuse a message sent while a reply
    is being generated in the session; chathub refuses it with ``conflict``
    and stores nothing, so the client can send it again afterwards."""
    async with custom_server(
        tmp_path, llm=scripted(text=SLOW_TEXT, chunk=8, rate=20), coalesce_ms=0
    ) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        other = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            first = await send_message(ws, sid, "c1", "first")
            await ws.until(lambda f: f["type"] == "reply.delta")

            for sender in (ws, other):  # whichever socket sends it
                err = await send_message(sender, sid, "c2", "second")
                assert err["type"] == "error" and err["code"] == "conflict", err
            assert [m["client_msg_id"] for m in await stored_messages(s.client, owner, sid)] == [
                "c1",
                None,
            ]

            await ws.request({"type": "reply.cancel", "reply_id": first["reply_id"]})
            await ws.until(reply_end(first["reply_id"]))
            again = await send_message(ws, sid, "c2", "second")
            assert again["type"] == "ack" and again["duplicate"] is False, again
            await ws.request({"type": "reply.cancel", "reply_id": again["reply_id"]})
            await ws.until(reply_end(again["reply_id"]))
        finally:
            await ws.close()
            await other.close()


async def test_cancel_mid_stream_keeps_the_partial_text(tmp_path: Path) -> None:
    async with custom_server(
        tmp_path, llm=scripted(text=SLOW_TEXT, chunk=4, rate=40), coalesce_ms=0
    ) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            reply_id = ack["reply_id"]
            await ws.until(lambda f: f["type"] == "reply.delta")
            await ws.until(lambda f: f["type"] == "reply.delta")
            cancelled = await ws.request({"type": "reply.cancel", "reply_id": reply_id})
            assert cancelled["type"] == "ack" and cancelled["reply_id"] == reply_id, cancelled
            assert cancelled["cancelling"] is True
            await ws.until(reply_end(reply_id))
            # cancelling it again, now that it is finished, is fine (idempotent)
            again = await ws.request({"type": "reply.cancel", "reply_id": reply_id})
            assert again["type"] == "ack" and again["reply_id"] == reply_id, again
            assert again["cancelling"] is False
        finally:
            await ws.close()

        done = ws.seen[-2] if ws.seen[-1]["type"] == "ack" else ws.seen[-1]
        assert done["type"] == "reply.completed", done
        assert done["stop_reason"] == "cancelled"
        text = delta_text(ws.seen, reply_id)
        assert text and len(text) < len(SLOW_TEXT) and SLOW_TEXT.startswith(text)
        assert done["message"]["content"] == text
        stored = await stored_message(s.client, owner, sid, reply_id)
        assert stored["content"] == text and stored["status"] == "complete"
        assert stored["stop_reason"] == "cancelled"
        # The provider never sent its usage: an estimate of what was spent
        assert done["usage"] == stored["usage"]
        assert done["usage"]["estimated"] is True and done["usage"]["input_tokens"] > 0
        assert done["usage"]["output_tokens"] == -(-len(text) // 4)
        assert_contiguous(events_of(ws.seen), first=1)


async def test_a_cancel_once_the_reply_is_ending_is_answered_false(tmp_path: Path) -> None:
    """A cancel that arrives after the reply's generation is over (it is
    being stored and announced) stops nothing: its ack says so, and the
    reply ends as it was ending."""
    async with custom_server(tmp_path, llm=scripted(text="a b c d ", chunk=2)) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ending, go_on = hold_reply_endings(s.server.state.session_log)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            reply_id = (await send_message(ws, sid, "c1"))["reply_id"]
            await asyncio.wait_for(ending.wait(), 10)
            late = await ws.request({"type": "reply.cancel", "reply_id": reply_id})
            go_on.set()
            done = await reply_finished(ws, reply_id, timeout=5)
        finally:
            await ws.close()
        assert late["type"] == "ack" and late["cancelling"] is False, late
        assert done["type"] == "reply.completed" and done["stop_reason"] == "end_turn", done


async def test_cancel_of_an_unknown_or_foreign_reply_is_not_found(
    clean_server: RunningServer,
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
) -> None:
    theirs = await new_session(client, other_team.owner)
    other_ws = await WsClient.connect(clean_server.ws_url, other_team.owner.api_key)
    try:
        await other_ws.request({"type": "join", "session_id": theirs})
        their_ack = await send_message(other_ws, theirs, "c1")
        await other_ws.until(reply_end(their_ack["reply_id"]))
    finally:
        await other_ws.close()

    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        await ws.request({"type": "join", "session_id": sid})
        mine = await send_message(ws, sid, "c1")
        await ws.until(reply_end(mine["reply_id"]))
        for reply_id in (
            "no-such-reply",
            "01900000-0000-7000-8000-000000000000",
            their_ack["reply_id"],  # another team's reply
            mine["message_id"],  # a user message is not a reply
        ):
            err = await ws.request({"type": "reply.cancel", "reply_id": reply_id})
            assert err["type"] == "error" and err["code"] == "not_found", (reply_id, err)
            assert (await ws.request({"type": "ping"}))["type"] == "pong"
        # a finished reply of one's own: acknowledged, nothing happens
        ok = await ws.request({"type": "reply.cancel", "reply_id": mine["reply_id"]})
        assert ok["type"] == "ack" and ok["reply_id"] == mine["reply_id"], ok
        assert ok["cancelling"] is False
    finally:
        await ws.close()
    stored = await stored_message(client, team.owner, sid, mine["reply_id"])
    assert stored["stop_reason"] == "end_turn"


async def test_reply_finishes_and_is_stored_with_no_socket_listening(tmp_path: Path) -> None:
    async with custom_server(
        tmp_path, llm=scripted(text=SLOW_TEXT, chunk=8, rate=100), coalesce_ms=0
    ) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        await ws.request({"type": "join", "session_id": sid})
        ack = await send_message(ws, sid, "c1")
        await ws.close()
        stored = await wait_finished(s.client, owner, sid, ack["reply_id"])
        assert stored["status"] == "complete" and stored["stop_reason"] == "end_turn"
        assert stored["content"] == SLOW_TEXT


async def test_failure_before_the_first_token_is_retried(tmp_path: Path) -> None:
    text = "retried and fine"
    llm = scripted(text=text, chunk=4, fail_before="overloaded", fail_times=1)
    async with custom_server(tmp_path, llm=llm, coalesce_ms=0) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            frames = await ws.until(reply_end(ack["reply_id"]), timeout=30)
        finally:
            await ws.close()
        types = [f["type"] for f in frames]
        assert types.count("reply.started") == 1 and "reply.failed" not in types, types
        assert frames[-1]["type"] == "reply.completed" and frames[-1]["stop_reason"] == "end_turn"
        assert delta_text(frames, ack["reply_id"]) == text == frames[-1]["message"]["content"]


async def test_failure_after_some_deltas_fails_the_reply_and_keeps_the_partial(
    tmp_path: Path,
) -> None:
    text = "ab cd ef gh ij kl mn op"
    async with custom_server(
        tmp_path, llm=scripted(text=text, chunk=3, fail_after=3), coalesce_ms=0
    ) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            frames = await ws.until(reply_end(ack["reply_id"]), timeout=30)
        finally:
            await ws.close()
        failed = frames[-1]
        assert failed["type"] == "reply.failed", failed
        assert failed["reply_id"] == ack["reply_id"]
        assert failed["code"] == "overloaded" and failed["retryable"] is True
        assert isinstance(failed["message"], str) and failed["message"]
        partial = delta_text(frames, ack["reply_id"])
        assert partial == text[:9]  # three chunks, never retried once text was shown
        assert [f["type"] for f in frames].count("reply.started") == 1
        stored = await stored_message(s.client, owner, sid, ack["reply_id"])
        assert stored["status"] == "failed" and stored["content"] == partial
        assert stored["stop_reason"] == "error"
        assert without_trace(stored) == failed["partial"]
        assert_contiguous(events_of(ws.seen), first=1)


async def test_rejected_request_fails_at_once_and_exhausted_retries_fail(tmp_path: Path) -> None:
    for name, fail, retryable in (
        ("rejected", "rejected", False),
        ("overloaded", "overloaded", True),
    ):
        async with custom_server(
            tmp_path, name, llm=scripted(text="never", fail_before=fail), coalesce_ms=0
        ) as s:
            owner = s.team.owner
            sid = await new_session(s.client, owner)
            ws = await WsClient.connect(s.server.ws_url, owner.api_key)
            try:
                await ws.request({"type": "join", "session_id": sid})
                ack = await send_message(ws, sid, "c1")
                frames = await ws.until(reply_end(ack["reply_id"]), timeout=30)
            finally:
                await ws.close()
            failed = frames[-1]
            assert failed["type"] == "reply.failed", failed
            assert failed["retryable"] is retryable, failed
            assert failed["code"] == ("provider_rejected" if fail == "rejected" else fail)
            assert delta_text(frames, ack["reply_id"]) == ""
            stored = await stored_message(s.client, owner, sid, ack["reply_id"])
            assert stored["status"] == "failed" and stored["content"] == ""


async def test_coalescing_merges_deltas_without_changing_the_text(tmp_path: Path) -> None:
    text = "".join(f"t{i:02d} " for i in range(100))  # 400 characters
    chunks = 100  # of 4 characters
    texts: dict[float, str] = {}
    counts: dict[float, int] = {}
    for coalesce_ms in (0, 200):
        async with custom_server(
            tmp_path,
            f"c{coalesce_ms}",
            llm=scripted(text=text, chunk=4),
            coalesce_ms=coalesce_ms,
        ) as s:
            owner = s.team.owner
            sid = await new_session(s.client, owner)
            ws = await WsClient.connect(s.server.ws_url, owner.api_key)
            try:
                await ws.request({"type": "join", "session_id": sid})
                ack = await send_message(ws, sid, "c1")
                frames = await ws.until(reply_end(ack["reply_id"]))
            finally:
                await ws.close()
            assert frames[-1]["type"] == "reply.completed", frames[-1]
            texts[coalesce_ms] = delta_text(frames, ack["reply_id"])
            counts[coalesce_ms] = sum(f["type"] == "reply.delta" for f in frames)
            assert frames[-1]["message"]["content"] == texts[coalesce_ms]
            assert_contiguous(events_of(frames))
    assert texts[0] == texts[200] == text
    assert counts[0] == chunks
    assert counts[200] <= chunks // 5, counts


class BothAdmitted(MemoryReplyLeases):
    """Leases that admit both of two sends at once, once both have asked: two
    instances that do not see each other's lease (as right after a Redis
    failover), each having found no such message yet."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.both = asyncio.Event()

    async def acquire(self, session_id: str, reply_id: str, owner_id: str, ttl_s: float) -> bool:
        self.asked += 1
        if self.asked == 2:
            self.both.set()
        await asyncio.wait_for(self.both.wait(), 10)
        return True


async def test_one_message_stored_at_once_by_two_instances_is_stored_and_answered_once(
    tmp_path: Path,
) -> None:
    """Both inserts race to the unique (session, client_msg_id) key; the loser's
    transaction fails there, and it answers as to a resend, naming the
    winner's message and reply. PostgreSQL only: SQLite's one connection
    serialises the two transactions, so the second finds the first's row."""
    async with server_on("postgres", tmp_path) as server:
        leases = BothAdmitted()
        st = server.state
        instances = [
            Replies(
                settings=st.settings,
                sessionmaker=st.sessionmaker,
                session_log=st.session_log,
                bus=st.bus,
                provider=st.provider,
                leases=leases,
            )
            for _ in range(2)
        ]
        try:
            team = await make_team(st)
            async with transaction(st.sessionmaker) as db:
                chat = await sessions_repo.create_session(
                    db, team_id=team.team_id, title="race", mode="chat", created_by=None
                )
            principal = Principal(
                member_id=team.owner.member_id, team_id=team.team_id, role="owner"
            )
            results = await asyncio.gather(
                *(
                    replies.send(principal, session_id=chat.id, client_msg_id="same", content="hi")
                    for replies in instances
                )
            )
            assert sorted(r.duplicate for r in results) == [False, True], results
            first, second = results
            assert first.message == second.message and first.reply_id == second.reply_id
            assert first.reply_id is not None
            for replies in instances:
                await replies.wait(first.reply_id)
            async with st.sessionmaker() as db:
                page = await sessions_repo.list_messages(
                    db, team_id=team.team_id, session_id=chat.id, limit=10, cursor=None
                )
            assert [(m.role, m.status) for m in page.items] == [
                ("user", "complete"),
                ("assistant", "complete"),
            ]
            assert page.items[1].id == first.reply_id
        finally:
            for replies in instances:
                await replies.close()


async def test_a_reply_whose_first_event_cannot_be_logged_ends_and_frees_the_session(
    tmp_path: Path,
) -> None:
    async with custom_server(tmp_path, llm=scripted(text="fine, thanks ")) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        session_log = s.server.state.session_log
        append = session_log.append
        failed: list[str] = []

        async def refuse_once(session_id: str, type_: str, data: Any) -> Any:
            if type_ == "message.created" and not failed:
                failed.append(type_)
                raise LogUnavailable("the session log is unreachable")
            return await append(session_id, type_, data)

        session_log.append = refuse_once  # type: ignore[method-assign]
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            first = await send_message(ws, sid, "c1")
            ended = await reply_finished(ws, first["reply_id"], timeout=10)
            assert ended["type"] == "reply.failed" and ended["code"] == "unavailable", ended
            assert ended["retryable"] is True
            # the session is free: the next message is answered
            second = await send_message(ws, sid, "c2", "again")
            assert second["type"] == "ack", second
            done = await reply_finished(ws, second["reply_id"], timeout=10)
            assert done["type"] == "reply.completed"
        finally:
            await ws.close()
        stored = await stored_message(s.client, owner, sid, first["reply_id"])
        assert stored["status"] == "failed"
        assert not s.server.state.replies.runs
