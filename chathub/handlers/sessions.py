"""``/chat/sessions``: sessions and their message history."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response, StreamingResponse

from chathub.auth import Principal
from chathub.errors import BadRequest, Unauthorized
from chathub.handlers.deps import MemberUser, PageDep, SessionDep, StateDep, Viewer
from chathub.handlers.schemas import Page, StrictBody, errors
from chathub.ids import new_id
from chathub.server import ratelimit
from chathub.server.connection import Connection
from chathub.server.state import AppState
from chathub.storage.db import transaction
from chathub.storage.models import Message
from chathub.storage.repositories import audit
from chathub.storage.repositories import modes as modes_repo
from chathub.storage.repositories import sessions as repo
from chathub.wire import MessageOut, SessionOut

log = logging.getLogger("chathub.sessions")

router = APIRouter(prefix="/chat/sessions", tags=["sessions"])

REPLY_RECHECK_S = 5.0
"""How often a request waiting for a reply to end reads the stored reply
again, in case the session's events missed its end."""

MODE_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


class SessionCreate(StrictBody):
    title: str = Field(default="", max_length=500)
    mode: str = Field(default="chat", pattern=MODE_PATTERN)


class SessionPatch(StrictBody):
    title: str | None = Field(default=None, max_length=500)
    mode: str | None = Field(default=None, pattern=MODE_PATTERN)
    archived: bool | None = None


async def _check_mode(db: AsyncSession, team_id: str, name: str) -> None:
    """Refuse an unknown mode. A team mode stays locked until the request's
    transaction commits, so that a delete of the mode either comes first
    (and this refuses it) or waits and counts this session."""
    await modes_repo.lock_mode(db, team_id=team_id, name=name)
    if await modes_repo.resolve_mode(db, team_id=team_id, name=name) is None:
        raise BadRequest(f"unknown mode {name!r}")


@router.get("", responses=errors())
async def list_sessions(
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    mode: Annotated[str | None, Query(pattern=MODE_PATTERN)] = None,
    archived: bool | None = None,
    q: Annotated[str | None, Query(max_length=200, description="title contains")] = None,
) -> Page[SessionOut]:
    """The team's sessions, newest first."""
    result = await repo.list_sessions(
        db,
        team_id=principal.team_id,
        limit=page.limit,
        cursor=page.cursor,
        mode=mode,
        archived=archived,
        q=q,
    )
    return Page(
        items=[SessionOut.model_validate(s) for s in result.items],
        next_cursor=result.next_cursor,
    )


@router.post("", status_code=201, responses=errors(403, 429))
async def create_session(
    body: SessionCreate, principal: MemberUser, db: SessionDep, state: StateDep
) -> SessionOut:
    """Past ``CHATHUB_RATE_USER_SESSIONS`` a minute for the member: 429."""
    limit = state.settings.rate_user_sessions
    await ratelimit.take(state.limiter, [("sessions", f"sess:u:{principal.member_id}", 1, limit)])
    await _check_mode(db, principal.team_id, body.mode)
    row = await repo.create_session(
        db,
        team_id=principal.team_id,
        title=body.title,
        mode=body.mode,
        created_by=principal.member_id,
    )
    view = SessionOut.model_validate(row)
    await state.session_feed.changed(principal.team_id, _json(view), created=True)
    return view


@router.get("/{session_id}", responses=errors(404))
async def get_session(session_id: str, principal: Viewer, db: SessionDep) -> SessionOut:
    row = await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    return SessionOut.model_validate(row)


@router.patch("/{session_id}", responses=errors(403, 404))
async def patch_session(
    session_id: str, body: SessionPatch, principal: MemberUser, db: SessionDep, state: StateDep
) -> SessionOut:
    """Change what the body names. Values the session already has change
    nothing: no new ``updated_at``, no ``session.updated`` event."""
    # Locked: a concurrent change of other fields (or a delete) is read
    # before this one writes, and announced before it.
    row = await repo.get_session(
        db, team_id=principal.team_id, session_id=session_id, for_update=True
    )
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "mode" in changes:
        await _check_mode(db, principal.team_id, changes["mode"])
    changes = {name: value for name, value in changes.items() if getattr(row, name) != value}
    if not changes:
        return SessionOut.model_validate(row)
    row = await repo.update_session(db, row, **changes)
    view = SessionOut.model_validate(row)
    await state.session_feed.changed(principal.team_id, _json(view), created=False)
    return view


@router.delete("/{session_id}", status_code=204, responses=errors(403, 404))
async def delete_session(session_id: str, principal: MemberUser, state: StateDep) -> Response:
    """Delete the session, and stop the reply it is generating, if any,
    wherever that runs: once the delete has committed, the reply ends as a
    cancelled one does (``reply.completed``, ``cancelled``) for the sockets
    still joined."""
    async with transaction(state.sessionmaker) as db:
        row = await repo.get_session(
            db, team_id=principal.team_id, session_id=session_id, for_update=True
        )
        await repo.delete_session(db, row)
        await audit.record(
            db,
            team_id=principal.team_id,
            actor_id=principal.member_id,
            action="session.delete",
            target_type="session",
            target_id=row.id,
        )
        await state.session_feed.deleted(principal.team_id, row.id)
    async with state.sessionmaker() as db:
        streaming = await repo.streaming_replies(db, session_id=session_id)
    for reply_id in streaming:
        try:
            await state.replies.cancel(principal, reply_id)
        except Exception:  # the delete itself has succeeded
            log.exception("could not stop reply %s of deleted session %s", reply_id, session_id)
    return Response(status_code=204)


def _json(view: SessionOut) -> dict[str, Any]:
    return view.model_dump(mode="json")


@router.get("/{session_id}/messages", responses=errors(404))
async def list_messages(
    session_id: str,
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    role: Annotated[str | None, Query(pattern="^(user|assistant)$")] = None,
) -> Page[MessageOut]:
    """The session's history, oldest first."""
    await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    result = await repo.list_messages(
        db,
        team_id=principal.team_id,
        session_id=session_id,
        limit=page.limit,
        cursor=page.cursor,
        role=role,
    )
    items = [message_view(m, principal) for m in result.items]
    return Page(items=items, next_cursor=result.next_cursor)


def message_view(row: Message, principal: Principal) -> MessageOut:
    """A message as ``principal`` may see it: ``trace`` is for admins."""
    out = MessageOut.model_validate(row)
    return out if principal.has_role("admin") else out.model_copy(update={"trace": None})


class MessageCreate(StrictBody):
    # Its length limit is the server's CHATHUB_MAX_MESSAGE_CHARS, checked as
    # on the socket (413 ``too_large``); the body limit bounds what is read.
    content: str = Field(min_length=1)
    client_msg_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="idempotency key"
    )
    mode: str | None = Field(default=None, pattern=MODE_PATTERN)
    file_ids: list[str] | None = Field(default=None, max_length=20)


class TurnOut(BaseModel):
    message: MessageOut
    reply: MessageOut | None
    duplicate: bool


@router.post(
    "/{session_id}/messages",
    responses={
        **errors(403, 404, 409, 413, 429, 503),
        200: {
            "description": "A retry: the stored turn; with `Accept: text/event-stream`, "
            "the session events of the reply as server-sent events",
            "content": {"text/event-stream": {}},
        },
        201: {"description": "The finished turn", "model": TurnOut},
    },
)
async def post_message(
    session_id: str, body: MessageCreate, principal: MemberUser, state: StateDep, request: Request
) -> Response:
    """Send a message without a socket. The reply streams as server-sent
    events (the same event objects as on the socket) when the client asks
    for ``text/event-stream``; otherwise this answers once the reply ends.
    A retry with the same ``client_msg_id`` starts nothing and answers with
    the stored turn as JSON, once its reply has ended, whichever instance
    generates it.

    The caller's credentials stay checked while the request lasts, as a
    socket's are: once they are revoked (or the token expires) the stream
    ends with an ``error`` event (``unauthorized``), or the wait answers
    401. The reply goes on and is stored: it belongs to the session."""
    async with state.sessionmaker() as db:
        chat = await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    await state.replies.floor_from_store(chat.id, chat.last_seq)
    sink = Connection(None, new_id(), principal, max_queue=1_000_000)
    state.credentials.follow(sink)
    try:
        await state.hub.join(sink, session_id, None)
        result = await state.replies.send(
            principal,
            session_id=session_id,
            client_msg_id=body.client_msg_id or new_id(),
            content=body.content,
            mode=body.mode,
            file_ids=body.file_ids,
        )
    except BaseException:
        _release(state, sink, session_id)
        raise
    wants_sse = accepts_event_stream(request.headers.get("accept", ""))
    if wants_sse and not result.duplicate and result.reply_id is not None:
        return StreamingResponse(
            _event_stream(state, sink, session_id, result.reply_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        if result.reply_id is not None:
            await _until_reply_ends(state, sink, principal.team_id, result.reply_id)
    finally:
        _release(state, sink, session_id)
    async with state.sessionmaker() as db:
        message = await repo.get_message(
            db, team_id=principal.team_id, message_id=result.message["id"]
        )
        reply = await repo.reply_for(db, user_message_id=message.id)
        turn = TurnOut(
            message=message_view(message, principal),
            reply=message_view(reply, principal) if reply else None,
            duplicate=result.duplicate,
        )
    return Response(
        turn.model_dump_json(),
        status_code=200 if result.duplicate else 201,
        media_type="application/json",
    )


def _release(state: AppState, sink: Connection, session_id: str) -> None:
    state.hub.leave(sink, session_id)
    state.credentials.unfollow(sink)


def _check_credentials(state: AppState, sink: Connection) -> None:
    """Raise Unauthorized once the sink is closed for its credentials."""
    reason = state.credentials.closed_reason(sink)
    if reason is not None:
        raise Unauthorized(reason)


async def _until_reply_ends(state: AppState, sink: Connection, team_id: str, reply_id: str) -> None:
    """Return once the reply has ended, wherever it runs (a retry may reach
    another instance than the one generating it): its run, when it runs
    here; else its ending event on the session, which ``sink`` (joined
    before the send) cannot miss while the stored reply still streams, since
    a reply is stored before its ending event is appended. Should the sink
    lose events (closed as slow, or left behind the log), the stored reply
    is read again every :data:`REPLY_RECHECK_S`. Raises Unauthorized as
    soon as the sink is closed for its credentials (the reply goes on)."""
    if reply_id in state.replies.runs:
        ended = asyncio.ensure_future(state.replies.wait(reply_id))
        revoked = asyncio.ensure_future(_until_revoked(state, sink))
        try:
            done, _ = await asyncio.wait((ended, revoked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            revoked.cancel()
        if ended not in done:
            _check_credentials(state, sink)
        return
    while await _still_streaming(state, team_id, reply_id):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPLY_RECHECK_S):
                await _ending_event(state, sink, reply_id)
        _check_credentials(state, sink)


async def _until_revoked(state: AppState, sink: Connection) -> None:
    """Return once ``sink`` is closed for its credentials. Its frames are
    dropped meanwhile: a reply that runs here is waited for through its run."""
    while not sink.closed:
        await sink.take()
    if state.credentials.closed_reason(sink) is None:
        await asyncio.get_running_loop().create_future()


async def _still_streaming(state: AppState, team_id: str, reply_id: str) -> bool:
    async with state.sessionmaker() as db:
        reply = await repo.get_message(db, team_id=team_id, message_id=reply_id)
    return reply.status == "streaming"


async def _ending_event(state: AppState, sink: Connection, reply_id: str) -> None:
    """Wait for ``reply_id``'s ``reply.completed`` or ``reply.failed`` on
    ``sink``; once the sink is closed, return if that was for its
    credentials, else wait for ever (the caller's timeout)."""
    while not sink.closed:
        for frame in await sink.take():
            if _ends(orjson.loads(frame), reply_id):
                return
    if state.credentials.closed_reason(sink) is not None:
        return
    await asyncio.get_running_loop().create_future()


def _ends(event: dict[str, Any], reply_id: str) -> bool:
    return event["type"] in ("reply.completed", "reply.failed") and (
        event.get("reply_id") == reply_id
    )


async def _event_stream(
    state: AppState, sink: Connection, session_id: str, reply_id: str
) -> AsyncIterator[str]:
    """The session's events until the reply's end; or, once the caller's
    credentials are revoked or expire, an ``error`` event (``unauthorized``,
    the socket's close reason as its message) and the end."""
    try:
        while not sink.closed:
            for frame in await sink.take():
                event = orjson.loads(frame)
                yield f"id: {event.get('seq', '')}\nevent: {event['type']}\ndata: {frame}\n\n"
                if _ends(event, reply_id):
                    return
        reason = state.credentials.closed_reason(sink)
        if reason is not None:
            error = orjson.dumps(Unauthorized(reason).frame()).decode()
            yield f"event: error\ndata: {error}\n\n"
    finally:
        _release(state, sink, session_id)


def accepts_event_stream(accept: str) -> bool:
    """Whether an ``Accept`` header takes ``text/event-stream`` (named, with
    a quality above 0; RFC 9110 §12.5.1). Wildcards do not ask for a stream."""
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() != "text/event-stream":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False
