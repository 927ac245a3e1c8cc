"""``GET /ws``: the socket of the wire contract. Thin: it authenticates,
parses frames and hands each to the hub or the reply service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from chathub import logs
from chathub.auth import Principal
from chathub.config import Settings
from chathub.errors import BadRequest, ChathubError, Forbidden, Unauthorized, Unavailable
from chathub.handlers.deps import authenticate, bearer_token
from chathub.ids import new_id
from chathub.server import metrics
from chathub.server.connection import (
    CLOSE_INTERNAL,
    CLOSE_UNAUTHORIZED,
    Connection,
)
from chathub.server.frames import (
    AuthFrame,
    CancelFrame,
    FrameError,
    JoinFrame,
    LeaveFrame,
    PingFrame,
    SendFrame,
    SubscribeFrame,
    UnsubscribeFrame,
    encode,
    parse_frame,
)
from chathub.server.state import AppState
from chathub.storage.db import backend_unreachable
from chathub.storage.repositories import sessions as sessions_repo
from chathub.storage.repositories import teams

log = logging.getLogger("chathub.ws")

PATH = "/ws"

PROTOCOL_VERSION = 1

CLOSE_TOO_MANY_SOCKETS = 4429
"""The member already has ``CHATHUB_WS_MAX_PER_MEMBER`` sockets open on this
instance (sent after authentication, instead of the welcome)."""


def origin_allowed(origin: str | None, host: str | None, settings: Settings) -> bool:
    """No Origin (not a browser) is allowed; ``*`` allows any; with an empty
    allow-list only same-origin pages are."""
    if origin is None:
        return True
    allowed = settings.allowed_origins
    if "*" in allowed:
        return True
    if allowed:
        return origin.rstrip("/") in {o.rstrip("/") for o in allowed}
    return host is not None and urlsplit(origin).netloc == host


async def websocket_app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/ws`` as a bare ASGI app: ``create_app`` hands it the socket's scope
    straight from the ASGI entry point. FastAPI's middleware and routing
    layers have nothing to do for this endpoint (it takes no dependencies and
    handles its own errors), yet each would keep a coroutine frame, and
    FastAPI its exit stacks, alive for as long as the socket is open: about
    6 KiB per socket, and idle sockets are most of what a hub holds."""
    await websocket_endpoint(WebSocket(scope, receive, send))


async def websocket_endpoint(websocket: WebSocket) -> None:
    state: AppState = websocket.state.chathub
    settings = state.settings
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), settings):
        await websocket.close(code=1008)  # before accept: the server answers 403
        return
    await websocket.accept()
    authenticated = await _authenticate(websocket, state)
    if authenticated is None:
        return
    principal, auth_id = authenticated
    hub = state.hub
    member_id = principal.member_id  # a fresh token is for the same member
    if not hub.admit(member_id, settings.ws_max_per_member):
        metrics.SOCKET_CAP_CLOSES.inc()
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_TOO_MANY_SOCKETS, reason="too many sockets")
        return
    conn = Connection(websocket, new_id(), principal, settings.ws_send_queue)
    logs.bind(request=conn.id, team=principal.team_id)
    try:
        await _greet(state, conn, auth_id)  # the first frame, before the hub sends any
        hub.register(conn)
        state.credentials.watch(conn)
        await _serve(websocket, state, conn)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("socket %s crashed", conn.id)
        conn.close_soon(CLOSE_INTERNAL, "internal error")
    finally:
        hub.release(member_id)  # first: a reconnecting client finds it free
        state.credentials.forget(conn)
        hub.unregister(conn)
        await conn.drain_and_stop(0)


async def _authenticate(
    websocket: WebSocket, state: AppState
) -> tuple[Principal, str | None] | None:
    """The upgrade's Authorization header, else a first ``auth`` frame within
    the timeout; with the auth frame's ``id``. Failure closes with 4401."""
    header = websocket.headers.get("authorization")
    request_id: str | None = None
    try:
        if header:
            token = bearer_token(header)
        else:
            async with asyncio.timeout(state.settings.ws_auth_timeout_s):
                message = await websocket.receive_text()
            frame = parse_frame(message)
            if not isinstance(frame, AuthFrame):
                raise Unauthorized("the first frame must be 'auth'")
            token, request_id = frame.token, frame.id
        async with state.sessionmaker() as db, db.begin():
            return await authenticate(state, db, token), request_id
    except (ChathubError, TimeoutError, KeyError, RuntimeError, WebSocketDisconnect) as exc:
        if isinstance(exc, ChathubError):
            reason = exc.detail
        elif isinstance(exc, TimeoutError):
            reason = "authentication timed out"
        else:
            reason = "authentication failed"
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_UNAUTHORIZED, reason=reason[:120])
        return None


async def _greet(state: AppState, conn: Connection, auth_id: str | None) -> None:
    # A call of its own: the socket keeps nothing of the welcome once sent.
    welcome = await _welcome(state, conn)
    if auth_id is not None:  # the welcome answers the auth frame
        welcome["id"] = auth_id
    conn.send(encode(welcome))


async def _welcome(state: AppState, conn: Connection) -> dict[str, Any]:
    p = conn.principal
    async with state.sessionmaker() as db:
        member = await teams.get_member(db, team_id=p.team_id, member_id=p.member_id)
    welcome = {
        "type": "welcome",
        "connection_id": conn.id,
        "user": {"id": member.id, "email": member.email, "name": member.name, "role": p.role},
        "team_id": p.team_id,
        "protocol": PROTOCOL_VERSION,
        "heartbeat_s": state.settings.ws_heartbeat_s,
    }
    return welcome | _expiry(p)


def _expiry(principal: Principal) -> dict[str, int]:
    """``expires_at`` (Unix seconds) for a credential that expires (a JWT):
    send a fresh ``auth`` frame before then, or the socket closes with 4401."""
    if principal.expires_at is None:
        return {}
    return {"expires_at": int(principal.expires_at)}


async def _serve(websocket: WebSocket, state: AppState, conn: Connection) -> None:
    # Once the server has closed the socket (or given up closing a peer that
    # does not read), the connection cancels this task: no frame may come.
    conn.reader = asyncio.current_task()
    try:
        await _read_frames(websocket, state, conn)
    except asyncio.CancelledError:
        if not conn.finished:
            raise  # not ours: shutdown


async def _read_frames(websocket: WebSocket, state: AppState, conn: Connection) -> None:
    # One call per frame: what a frame brought and answered dies with its
    # call, so an idle socket holds nothing of its last frame.
    while await _read_frame(websocket, state, conn):
        pass


async def _read_frame(websocket: WebSocket, state: AppState, conn: Connection) -> bool:
    """Wait for one frame and answer it; False once the peer is gone."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return False
    if conn.closed:
        # We are closing it (maybe from within a frame's answer): frames the
        # peer sent meanwhile get no answer; read on until its close arrives,
        # or until the close gives up and stops this reader.
        return True
    metrics.FRAMES_IN.inc()
    text = message.get("text")
    if text is None:
        conn.send(encode(BadRequest("binary frames are not accepted").frame()))
        return True
    request_id: str | None = None
    try:
        frame = parse_frame(text)
        request_id = frame.id
        replies = await _handle(state, conn, frame)
    except FrameError as exc:
        conn.send(encode(exc.frame(exc.request_id)))
        return True
    except ChathubError as exc:
        conn.send(encode(exc.frame(request_id)))
        return True
    except Exception as exc:
        if backend_unreachable(exc):
            # PostgreSQL or Redis is down: refuse this frame and keep the
            # socket; the client tries again when it is back.
            log.warning("frame refused, a backing service failed: %r", exc)
            unavailable = Unavailable("a backing service is unavailable; try again shortly")
            conn.send(encode(unavailable.frame(request_id)))
        else:
            # A fault of ours: this frame fails with `internal`; the socket,
            # its sessions and its other requests go on.
            log.exception("socket %s: a frame failed", conn.id)
            conn.send(encode(ChathubError().frame(request_id)))
        return True
    if request_id is not None:
        direct = replies[0]
        assert isinstance(direct, dict)  # the direct answer is built here
        direct["id"] = request_id
    for reply in replies:
        conn.send(reply if isinstance(reply, str) else encode(reply))
    return True


async def _handle(state: AppState, conn: Connection, frame: Any) -> list[dict[str, Any] | str]:
    """The frames that answer ``frame``: the direct answer first."""
    if isinstance(frame, PingFrame):
        return [{"type": "pong"}]
    if isinstance(frame, AuthFrame):
        # A fresh token for the same member, before the socket's expires.
        principal = await state.credentials.refresh(conn, frame.token)
        return [{"type": "ack", "role": principal.role, **_expiry(principal)}]
    if not isinstance(frame, LeaveFrame | UnsubscribeFrame):
        await state.credentials.check(conn)
    p = conn.principal
    if isinstance(frame, JoinFrame):
        async with state.sessionmaker() as db:
            chat = await sessions_repo.get_session(
                db, team_id=p.team_id, session_id=frame.session_id
            )
        await state.replies.floor_from_store(chat.id, chat.last_seq)
        ack = await state.hub.join(conn, chat.id, frame.after_seq)
        return [{"type": "ack", **ack}]
    if isinstance(frame, LeaveFrame):
        state.hub.leave(conn, frame.session_id)
        return [{"type": "ack", "session_id": frame.session_id}]
    if isinstance(frame, SendFrame):
        if not p.has_role("member"):
            raise Forbidden("viewers cannot send messages")
        result = await state.replies.send(
            p,
            session_id=frame.session_id,
            client_msg_id=frame.client_msg_id,
            content=frame.content,
            mode=frame.mode,
            file_ids=frame.file_ids,
        )
        return [
            {
                "type": "ack",
                "session_id": frame.session_id,
                "message_id": result.message["id"],
                "reply_id": result.reply_id,
                "duplicate": result.duplicate,
            }
        ]
    if isinstance(frame, CancelFrame):
        if not p.has_role("member"):
            raise Forbidden("viewers cannot cancel replies")
        cancelling = await state.replies.cancel(p, frame.reply_id)
        return [{"type": "ack", "reply_id": frame.reply_id, "cancelling": cancelling}]
    if isinstance(frame, SubscribeFrame) and frame.channel == "sessions":
        state.hub.subscribe_sessions(conn)
        return [{"type": "ack", "channel": frame.channel}]
    if isinstance(frame, SubscribeFrame):
        # Subscribed first, so no update is missed while the snapshot is read;
        # those held meanwhile follow it if they are newer.
        state.hub.subscribe_dashboard(conn)
        try:
            snapshot = await state.dashboards.snapshot(p.team_id)
        except BaseException:
            state.hub.unsubscribe_dashboard(conn)
            raise
        newer = state.hub.dashboard_ready(conn, snapshot["version"])
        return [{"type": "ack", "channel": frame.channel}, snapshot, *newer]
    if isinstance(frame, UnsubscribeFrame):
        if frame.channel == "sessions":
            state.hub.unsubscribe_sessions(conn)
        else:
            state.hub.unsubscribe_dashboard(conn)
        return [{"type": "ack", "channel": frame.channel}]
    raise BadRequest("unsupported frame")
