"""``GET /ws`` over real sockets: auth, origin check, request/reply framing,
bad frames, size limit, heartbeats and slow consumers.

The helpers at the top are shared with ``test_replies.py`` and
``test_hub_resume.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from prometheus_client import REGISTRY
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.harness import (
    Actor,
    RunningServer,
    TeamFixture,
    http_client,
    make_team,
    start_server,
    test_settings,
)
from tests.wsclient import WsClient, reply_end

# -- helpers shared by the socket suites ---------------------------------------


@dataclass
class Served:
    """A server started for one test, with a team and an HTTP client."""

    server: RunningServer
    team: TeamFixture
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def custom_server(
    tmp_path: Path, name: str = "srv", **overrides: Any
) -> AsyncIterator[Served]:
    """A server of its own (SQLite file under ``tmp_path``) with ``overrides``
    applied to the test settings; always stopped on the way out."""
    data_dir = tmp_path / name
    data_dir.mkdir(parents=True, exist_ok=True)
    server = await start_server(
        test_settings(f"sqlite+aiosqlite:///{data_dir / 'chathub.db'}", data_dir, **overrides)
    )
    try:
        team = await make_team(server.state)
        async with http_client(server) as client:
            yield Served(server, team, client)
    finally:
        await server.stop()


def scripted(**params: Any) -> str:
    """A ``scripted://`` provider URL (see ``chathub.llm.scripted``)."""
    return "scripted://?" + urlencode({k: str(v) for k, v in params.items()})


async def new_session(client: httpx.AsyncClient, actor: Actor, title: str = "t") -> str:
    r = await client.post("/chat/sessions", json={"title": title}, headers=actor.headers)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


async def stored_messages(
    client: httpx.AsyncClient, actor: Actor, sid: str
) -> list[dict[str, Any]]:
    """The session's whole history over REST, oldest first."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"cursor": cursor} if cursor else {})
        r = await client.get(f"/chat/sessions/{sid}/messages", params=params, headers=actor.headers)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items


async def stored_message(
    client: httpx.AsyncClient, actor: Actor, sid: str, message_id: str
) -> dict[str, Any]:
    found = [m for m in await stored_messages(client, actor, sid) if m["id"] == message_id]
    assert len(found) == 1, f"message {message_id} not stored exactly once"
    return found[0]


async def wait_finished(
    client: httpx.AsyncClient, actor: Actor, sid: str, message_id: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll REST until the message has left ``streaming``."""
    async with asyncio.timeout(timeout):
        while True:
            message = await stored_message(client, actor, sid, message_id)
            if message["status"] != "streaming":
                return message
            await asyncio.sleep(0.05)


def without_trace(message: dict[str, Any]) -> dict[str, Any]:
    """A message as REST shows it, less ``trace`` (REST-only, admins see it)."""
    return {k: v for k, v in message.items() if k != "trace"}


def events_of(frames: list[dict[str, Any]], sid: str | None = None) -> list[dict[str, Any]]:
    """The session events among ``frames`` (those with a ``seq``)."""
    return [f for f in frames if "seq" in f and (sid is None or f["session_id"] == sid)]


def assert_contiguous(events: list[dict[str, Any]], first: int | None = None) -> None:
    seqs = [e["seq"] for e in events]
    start = seqs[0] if first is None else first
    assert seqs == list(range(start, start + len(seqs))), f"seq gap or repeat: {seqs}"


def delta_text(frames: list[dict[str, Any]], reply_id: str) -> str:
    return "".join(
        f["text"] for f in frames if f["type"] == "reply.delta" and f["reply_id"] == reply_id
    )


async def send_message(
    ws: WsClient, sid: str, client_msg_id: str, content: str = "hello", **extra: Any
) -> dict[str, Any]:
    """``message.send`` and its direct answer (ack or error)."""
    return await ws.request(
        {
            "type": "message.send",
            "session_id": sid,
            "client_msg_id": client_msg_id,
            "content": content,
            **extra,
        }
    )


async def reply_finished(ws: WsClient, reply_id: str, timeout: float = 30) -> dict[str, Any]:
    """The reply's last event, whether already received or still to come."""
    ended = reply_end(reply_id)
    for frame in ws.seen:
        if ended(frame):
            return frame
    return (await ws.until(ended, timeout))[-1]


async def closed_with(conn: Any, timeout: float = 15) -> int | None:
    """Read until the server closes; the close code it sent."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(timeout):
            while True:
                await conn.recv()
    rcvd = info.value.rcvd
    return rcvd.code if rcvd is not None else None


def hold_reply_endings(session_log: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``session_log`` hold each ``reply.completed`` (stored with its
    reply by then, not yet appended) until the second event is set; the
    first is set when one is being held."""
    append = session_log.append
    held, go_on = asyncio.Event(), asyncio.Event()

    async def append_the_ending_later(session_id: str, type_: str, data: Any) -> Any:
        if type_ == "reply.completed":
            held.set()
            await go_on.wait()
        return await append(session_id, type_, data)

    session_log.append = append_the_ending_later
    return held, go_on


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


class RawSocket:
    """A WebSocket client over a plain socket that reads only when told to:
    a reader that stops reading.

    Its receive buffer is set, not autotuned (a reader that stops reading
    never grows it), but it holds several segments: a buffer of about one
    loopback segment (64 KiB) or less makes the peer's send window close on
    every segment, and once the reader reads again the data trickles in at
    one segment per zero-window probe, minutes for the megabytes the
    server's kernel queued meanwhile."""

    def __init__(self, sock: socket.socket, proto: ClientProtocol) -> None:
        self.sock = sock
        self.proto = proto
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, url: str, token: str, rcvbuf: int = 256 * 1024) -> RawSocket:
        uri = parse_uri(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        proto = ClientProtocol(uri, max_size=None)
        raw = cls(sock, proto)
        request = proto.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        proto.send_request(request)
        await raw.flush()
        response = await raw.read_until(lambda e: isinstance(e, Response))
        assert isinstance(response, Response) and response.status_code == 101
        return raw

    async def flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                await self.loop.sock_sendall(self.sock, data)

    async def send(self, frame: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(frame).encode())
        await self.flush()

    async def read_until(self, pred: Any) -> Any:
        """Read (and parse) until an event matches ``pred``; None at EOF."""
        while True:
            for event in self.proto.events_received():
                if pred(event):
                    return event
            data = await self.loop.sock_recv(self.sock, 65536)
            if not data:
                self.proto.receive_eof()
                return None
            self.proto.receive_data(data)

    async def frame(self, type: str) -> dict[str, Any]:
        event = await self.read_until(
            lambda e: (
                isinstance(e, Frame)
                and e.opcode == Opcode.TEXT
                and json.loads(bytes(e.data))["type"] == type
            )
        )
        assert event is not None, f"connection ended before a {type!r} frame"
        frame: dict[str, Any] = json.loads(bytes(event.data))
        return frame

    async def close_code(self) -> int | None:
        """Read everything up to the server's close frame; its code."""
        event = await self.read_until(lambda e: isinstance(e, Frame) and e.opcode == Opcode.CLOSE)
        if event is None:
            return None
        await self.flush()  # our answer to the close
        return self.proto.close_rcvd.code if self.proto.close_rcvd else None

    def close(self) -> None:
        self.sock.close()


# -- auth ------------------------------------------------------------------------


async def test_header_auth_welcomes_with_the_user_and_team(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        w = ws.welcome
        assert w["type"] == "welcome" and w["protocol"] == 1
        assert isinstance(w["connection_id"], str) and w["connection_id"]
        assert w["team_id"] == team.team_id
        assert w["user"]["id"] == team.owner.member_id and w["user"]["role"] == "owner"
        assert "@" in w["user"]["email"]
        assert w["heartbeat_s"] == clean_server.settings.ws_heartbeat_s
        pong = await ws.request({"type": "ping"})
        assert pong["type"] == "pong"
    finally:
        await ws.close()


async def test_first_frame_auth_with_an_api_key_and_with_a_jwt(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    member = await team.actor("member")
    ws = await WsClient.connect(clean_server.ws_url, member.api_key, first_frame_auth=True)
    assert ws.welcome["user"]["id"] == member.member_id and ws.welcome["user"]["role"] == "member"
    assert "id" not in ws.welcome
    await ws.close()

    # the welcome is the answer to the auth frame: it echoes the frame's id
    async with websockets.connect(clean_server.ws_url) as conn:
        await conn.send(json.dumps({"type": "auth", "token": member.api_key, "id": "hello-1"}))
        welcome = json.loads(await asyncio.wait_for(conn.recv(), 10))
        assert welcome["type"] == "welcome" and welcome["id"] == "hello-1", welcome

    r = await client.post("/auth/token", json={"api_key": member.api_key})
    assert r.status_code == 200, r.text
    jwt = r.json()["access_token"]
    for first_frame in (True, False):
        ws = await WsClient.connect(clean_server.ws_url, jwt, first_frame_auth=first_frame)
        assert ws.welcome["user"]["id"] == member.member_id
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
        await ws.close()


@pytest.mark.parametrize("token", ["chk_not-a-real-key", "not.a.jwt", "Basic abc"])
async def test_bad_token_in_header_closes_4401(
    clean_server: RunningServer, team: TeamFixture, token: str
) -> None:
    async with websockets.connect(
        clean_server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as conn:
        assert await closed_with(conn) == 4401


async def test_malformed_authorization_header_closes_4401(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    async with websockets.connect(
        clean_server.ws_url, additional_headers={"Authorization": f"Token {team.owner.api_key}"}
    ) as conn:
        assert await closed_with(conn) == 4401


@pytest.mark.parametrize("token", ["chk_not-a-real-key", "not.a.jwt"])
async def test_bad_token_in_first_frame_closes_4401(
    clean_server: RunningServer, team: TeamFixture, token: str
) -> None:
    async with websockets.connect(clean_server.ws_url) as conn:
        await conn.send(json.dumps({"type": "auth", "token": token}))
        assert await closed_with(conn) == 4401


@pytest.mark.parametrize(
    "first",
    [
        json.dumps({"type": "ping", "id": "p"}),
        json.dumps({"type": "join", "session_id": "s"}),
        "not json",
        json.dumps({"type": "auth"}),
        b"\x00binary",
    ],
)
async def test_first_frame_that_is_not_auth_closes_4401(
    clean_server: RunningServer, team: TeamFixture, first: str | bytes
) -> None:
    async with websockets.connect(clean_server.ws_url) as conn:
        await conn.send(first)
        assert await closed_with(conn) == 4401


async def test_revoked_member_cannot_connect(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    member = await team.actor("member")
    r = await client.delete(f"/team/api-keys/{member.api_key_id}", headers=team.owner.headers)
    assert r.status_code in (200, 204), r.text
    async with websockets.connect(
        clean_server.ws_url, additional_headers={"Authorization": f"Bearer {member.api_key}"}
    ) as conn:
        assert await closed_with(conn) == 4401


async def test_no_auth_within_the_timeout_closes_4401(tmp_path: Path) -> None:
    async with custom_server(tmp_path, ws_auth_timeout_s=0.5) as s:
        async with websockets.connect(s.server.ws_url) as conn:
            assert await closed_with(conn) == 4401
            assert conn.close_reason == "authentication timed out"
        # A client that authenticates in time is not affected.
        ws = await WsClient.connect(s.server.ws_url, s.team.owner.api_key, first_frame_auth=True)
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
        await ws.close()


async def test_origin_allow_list(tmp_path: Path) -> None:
    async with custom_server(tmp_path, allowed_origins=["https://app.example"]) as s:
        url, key = s.server.ws_url, s.team.owner.api_key
        with pytest.raises(InvalidStatus) as info:
            await WsClient.connect(url, key, origin="https://evil.example")
        assert info.value.response.status_code == 403
        # refused before upgrade whatever the credentials
        with pytest.raises(InvalidStatus) as info:
            await WsClient.connect(url, None, origin="https://app.example.evil.example")
        assert info.value.response.status_code == 403

        allowed = await WsClient.connect(url, key, origin="https://app.example")
        assert allowed.welcome["type"] == "welcome"
        await allowed.close()
        no_origin = await WsClient.connect(url, key)  # not a browser
        assert no_origin.welcome["type"] == "welcome"
        await no_origin.close()


async def test_default_allow_list_is_same_origin_only(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    with pytest.raises(InvalidStatus) as info:
        await WsClient.connect(
            clean_server.ws_url, team.owner.api_key, origin="https://evil.example"
        )
    assert info.value.response.status_code == 403
    same = await WsClient.connect(
        clean_server.ws_url, team.owner.api_key, origin=f"http://127.0.0.1:{clean_server.port}"
    )
    assert same.welcome["type"] == "welcome"
    await same.close()


# -- request / reply ---------------------------------------------------------------


async def test_ping_gets_pong_with_the_same_id(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        await ws.send({"type": "ping", "id": "abc-123"})
        assert await ws.recv() == {"type": "pong", "id": "abc-123"}
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}
    finally:
        await ws.close()


async def test_heartbeats_arrive_at_the_configured_interval(tmp_path: Path) -> None:
    async with custom_server(tmp_path, ws_heartbeat_s=0.2) as s:
        ws = await WsClient.connect(s.server.ws_url, s.team.owner.api_key)
        try:
            assert ws.welcome["heartbeat_s"] == 0.2
            beats = 0
            async with asyncio.timeout(20):
                while beats < 3:
                    frame = json.loads(await ws.conn.recv())
                    assert frame == {"type": "heartbeat"}
                    beats += 1
            # heartbeats do not disturb request/reply
            assert (await ws.request({"type": "ping"}))["type"] == "pong"
        finally:
            await ws.close()


async def test_leave_stops_events_and_acks(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    watcher = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    sender = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert (await watcher.request({"type": "join", "session_id": sid}))["type"] == "ack"
        left = await watcher.request({"type": "leave", "session_id": sid})
        assert left["type"] == "ack" and left["session_id"] == sid
        assert (await sender.request({"type": "join", "session_id": sid}))["type"] == "ack"
        ack = await send_message(sender, sid, "c1")
        await sender.until(reply_end(ack["reply_id"]))
        # Events are queued on delivery, so a pong after the reply ended comes
        # after any event the watcher would (wrongly) have been sent.
        await watcher.request({"type": "ping"})
        assert events_of(watcher.seen) == []
    finally:
        await watcher.close()
        await sender.close()


# -- bad frames -----------------------------------------------------------------


BAD_FRAMES: list[tuple[str, str | bytes, str | None]] = [
    ("invalid JSON", "{not json", None),
    ("a JSON array", json.dumps([{"type": "ping", "id": "x"}]), None),
    ("a JSON string", json.dumps("ping"), None),
    ("no type", json.dumps({"id": "b1"}), "b1"),
    ("unknown type", json.dumps({"type": "message.edit", "id": "b2"}), "b2"),
    ("missing field", json.dumps({"type": "join", "id": "b3"}), "b3"),
    (
        "after_seq not an int",
        json.dumps({"type": "join", "session_id": "s", "after_seq": "x", "id": "b4"}),
        "b4",
    ),
    (
        "content not a string",
        json.dumps(
            {
                "type": "message.send",
                "session_id": "s",
                "client_msg_id": "c",
                "content": 5,
                "id": "b5",
            }
        ),
        "b5",
    ),
    ("channel not dashboard", json.dumps({"type": "subscribe", "channel": "x", "id": "b6"}), "b6"),
    ("id too long", json.dumps({"type": "ping", "id": "i" * 65}), None),
    ("id not a string", json.dumps({"type": "ping", "id": 7}), None),
    ("binary frame", b'{"type": "ping", "id": "bin"}', None),
]


async def test_every_bad_frame_gets_an_error_and_the_socket_stays_open(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        for n, (what, payload, rid) in enumerate(BAD_FRAMES):
            await ws.conn.send(payload)
            err = await ws.recv()
            assert err["type"] == "error", (what, err)
            assert err["code"] == "bad_request", (what, err)
            assert isinstance(err["message"], str) and err["message"], (what, err)
            assert err.get("id") == rid, (what, err)
            pong = await ws.request({"type": "ping"})
            assert pong["type"] == "pong", (what, n, pong)
    finally:
        await ws.close()


async def test_a_fault_in_one_frame_is_an_internal_error_and_the_socket_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with custom_server(tmp_path, llm=scripted(text="fine, thanks ")) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        replies = s.server.state.replies

        async def broken(*_args: Any, **_kwargs: Any) -> bool:
            raise RuntimeError("a bug")

        replies.cancel = broken  # type: ignore[method-assign]
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            err = await ws.request({"type": "reply.cancel", "reply_id": "r-1"})
            assert err["type"] == "error" and err["code"] == "internal", err
            assert err["id"] and err["message"]
            # the socket and its session go on
            ack = await send_message(ws, sid, "c1")
            done = await reply_finished(ws, ack["reply_id"])
            assert done["type"] == "reply.completed" and done["message"]["content"]
        finally:
            await ws.close()
    assert "RuntimeError: a bug" in caplog.text


async def test_unknown_or_other_teams_session_is_not_found(
    clean_server: RunningServer,
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
) -> None:
    theirs = await new_session(client, other_team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        for frame in (
            {"type": "join", "session_id": theirs},
            {"type": "join", "session_id": theirs, "after_seq": 0},
            {"type": "join", "session_id": "no-such-session"},
            {"type": "message.send", "session_id": theirs, "client_msg_id": "c", "content": "x"},
        ):
            err = await ws.request(frame)
            assert err["type"] == "error" and err["code"] == "not_found", (frame, err)
            assert err["id"].startswith("r")
            assert (await ws.request({"type": "ping"}))["type"] == "pong"
    finally:
        await ws.close()
    # nothing was written to the other team's session
    assert await stored_messages(client, other_team.owner, theirs) == []


async def test_viewer_may_join_but_not_send_or_cancel(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    viewer = await team.actor("viewer")
    ws = await WsClient.connect(clean_server.ws_url, viewer.api_key)
    try:
        assert (await ws.request({"type": "join", "session_id": sid}))["type"] == "ack"
        err = await send_message(ws, sid, "c1")
        assert err["type"] == "error" and err["code"] == "forbidden", err
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
        err = await ws.request({"type": "reply.cancel", "reply_id": "whatever"})
        assert err["type"] == "error" and err["code"] == "forbidden", err
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
    finally:
        await ws.close()
    assert await stored_messages(client, team.owner, sid) == []


async def test_unknown_mode_is_bad_request_and_writes_nothing(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert (await ws.request({"type": "join", "session_id": sid}))["type"] == "ack"
        err = await send_message(ws, sid, "c1", mode="no-such-mode")
        assert err["type"] == "error" and err["code"] == "bad_request", err
        # the same client_msg_id is still free
        ack = await send_message(ws, sid, "c1")
        assert ack["type"] == "ack" and ack["duplicate"] is False, ack
        await ws.until(reply_end(ack["reply_id"]))
    finally:
        await ws.close()


async def test_frame_over_the_size_limit_closes_1009(
    clean_server: RunningServer, team: TeamFixture
) -> None:
    limit = clean_server.settings.ws_max_frame_bytes
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        # just under the limit is fine (unknown fields are ignored)
        frame = {"type": "ping", "id": "big", "pad": ""}
        frame["pad"] = "x" * (limit - len(json.dumps(frame)))
        assert len(json.dumps(frame).encode()) == limit
        await ws.conn.send(json.dumps(frame))
        assert await ws.recv() == {"type": "pong", "id": "big"}
        frame["pad"] += "x"
        await ws.conn.send(json.dumps(frame))
        assert await closed_with(ws.conn) == 1009
    finally:
        await ws.close()


# -- slow consumers -------------------------------------------------------------


async def test_slow_reader_is_closed_4408_and_others_get_the_whole_reply(
    tmp_path: Path,
) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(4096))  # the chat mode's longest reply
    settings: dict[str, Any] = {
        "llm": scripted(text=text, chunk=1, rate=0),
        "coalesce_ms": 0,
        "ws_send_queue": 16,
    }
    async with custom_server(tmp_path, **settings) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        slow = await RawSocket.connect(s.server.ws_url, owner.api_key)
        normal = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await slow.send({"type": "join", "session_id": sid, "id": "j"})
            assert (await slow.frame("ack"))["id"] == "j"
            assert (await normal.request({"type": "join", "session_id": sid}))["type"] == "ack"
            closes_before = metric("chathub_slow_client_closes_total")

            # The slow socket reads nothing from here on. The kernel buffers
            # take a few replies' worth before its queue overflows.
            for turn in range(40):
                ack = await send_message(normal, sid, f"c{turn}")
                assert ack["type"] == "ack", ack
                frames = await normal.until(reply_end(ack["reply_id"]), timeout=60)
                assert frames[-1]["type"] == "reply.completed", frames[-1]
                assert delta_text(frames, ack["reply_id"]) == text
                if metric("chathub_slow_client_closes_total") > closes_before:
                    break
            assert metric("chathub_slow_client_closes_total") == closes_before + 1
            # the normal reader saw every event of every turn, in order
            assert_contiguous(events_of(normal.seen, sid), first=1)

            # It stays stalled a while longer (a phone in a tunnel); once it
            # reads again it finds the data it was sent, then the close code.
            await asyncio.sleep(3)
            assert await asyncio.wait_for(slow.close_code(), 30) == 4408
            # and the normal one is still served
            assert (await normal.request({"type": "ping"}))["type"] == "pong"
        finally:
            slow.close()
            await normal.close()


async def test_reader_that_never_reads_again_is_dropped(tmp_path: Path) -> None:
    """Past the close grace the server stops waiting for a reader that never
    reads: it lets go of the socket, and the peer, should it ever read again,
    finds the end of the stream instead of a connection that looks alive."""
    text = "".join(chr(ord("a") + i % 26) for i in range(4096))
    settings: dict[str, Any] = {
        "llm": scripted(text=text, chunk=1),
        "coalesce_ms": 0,
        "ws_send_queue": 16,
    }
    async with custom_server(tmp_path, **settings) as s:
        owner = s.team.owner
        hub = s.server.state.hub
        sid = await new_session(s.client, owner)
        stalled = await RawSocket.connect(s.server.ws_url, owner.api_key)
        normal = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await stalled.send({"type": "join", "session_id": sid})
            await stalled.frame("ack")
            await normal.request({"type": "join", "session_id": sid})
            assert len(hub.connections) == 2
            closes_before = metric("chathub_slow_client_closes_total")
            for turn in range(40):
                ack = await send_message(normal, sid, f"c{turn}")
                await normal.until(reply_end(ack["reply_id"]), timeout=60)
                if metric("chathub_slow_client_closes_total") > closes_before:
                    break
            assert metric("chathub_slow_client_closes_total") == closes_before + 1
            # the server lets go of it (after CLOSE_GRACE_S) ...
            for _ in range(600):
                if len(hub.connections) == 1:
                    break
                await asyncio.sleep(0.1)
            assert len(hub.connections) == 1, "the stalled socket is still held"
            # ... and serves the others as before
            assert (await normal.request({"type": "ping"}))["type"] == "pong"
            # the stalled peer, reading at last, reaches the end of the stream
            assert await asyncio.wait_for(stalled.close_code(), 30) in (None, 4408)
        finally:
            stalled.close()
            await normal.close()
