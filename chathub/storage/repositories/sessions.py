"""Chat sessions and their messages."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, case, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.errors import NotFound
from chathub.ids import new_id
from chathub.storage.db import rowcount
from chathub.storage.models import ChatSession, Message, utcnow
from chathub.storage.pagination import Page, paginate

_messages = cast(Table, Message.__table__)
_sessions = cast(Table, ChatSession.__table__)

# The statements of every chat turn are built once, with bound parameters:
# building one (and its cache key) costs SQLAlchemy more than SQLite takes
# to run it, and a turn runs six.
_GET_SESSION = select(ChatSession).where(
    ChatSession.id == bindparam("session_id"),
    ChatSession.team_id == bindparam("team_id"),
    ChatSession.deleted_at.is_(None),
)
_GET_SESSION_FOR_UPDATE = _GET_SESSION.with_for_update(of=ChatSession)
_SENT_WITH_CLIENT_MSG_ID = (
    Message.session_id == bindparam("session_id"),
    Message.client_msg_id == bindparam("client_msg_id"),
)
# FOR SHARE (PostgreSQL): a delete of the session waits until the send has
# committed, and then finds (and stops) the reply the send started.
_SESSION_AND_SENT = _GET_SESSION.add_columns(
    select(Message.id).where(*_SENT_WITH_CLIENT_MSG_ID).scalar_subquery()
).with_for_update(read=True, of=ChatSession)
_BY_CLIENT_MSG_ID = select(Message).where(*_SENT_WITH_CLIENT_MSG_ID)
_INSERT_MESSAGES = insert(_messages)
_FINISH_REPLY = (
    update(_messages)
    .where(_messages.c.id == bindparam("message_id"), _messages.c.status == "streaming")
    .values(
        content=bindparam("new_content"),
        status=bindparam("new_status"),
        stop_reason=bindparam("new_stop_reason"),
        usage=bindparam("new_usage"),
        trace=bindparam("new_trace"),
        completed_at=bindparam("new_completed_at"),
    )
    .returning(*_messages.c)
)
_CHECKPOINT_REPLY = (
    update(_messages)
    .where(_messages.c.id == bindparam("message_id"), _messages.c.status == "streaming")
    .values(content=bindparam("new_content"))
)
_RAISE_LAST_SEQ = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("session_id"), _sessions.c.last_seq < bindparam("seq"))
    .values(last_seq=bindparam("seq"))
)


_REPLY_ENDED = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("session_id"))
    .values(
        last_seq=case(
            (_sessions.c.last_seq < bindparam("seq"), bindparam("seq")),
            else_=_sessions.c.last_seq,
        ),
        last_message_at=case(
            (
                _sessions.c.last_message_at.is_(None)
                | (_sessions.c.last_message_at < bindparam("at")),
                bindparam("at"),
            ),
            else_=_sessions.c.last_message_at,
        ),
    )
)


async def create_session(
    session: AsyncSession, *, team_id: str, title: str, mode: str, created_by: str | None
) -> ChatSession:
    row = ChatSession(team_id=team_id, title=title, mode=mode, created_by=created_by)
    session.add(row)
    await session.flush()
    return row


async def get_session(
    session: AsyncSession, *, team_id: str, session_id: str, for_update: bool = False
) -> ChatSession:
    """The live session; ``for_update`` locks its row until the transaction
    ends (PostgreSQL), so that a change reads what the one before it wrote."""
    query = _GET_SESSION_FOR_UPDATE if for_update else _GET_SESSION
    row = await session.scalar(query, {"session_id": session_id, "team_id": team_id})
    if row is None:
        raise NotFound("session not found")
    return row


async def session_for_send(
    session: AsyncSession, *, team_id: str, session_id: str, client_msg_id: str
) -> tuple[ChatSession, str | None]:
    """The session (as :func:`get_session`) and the id of the message already
    sent to it with ``client_msg_id``, if any: one statement for a send."""
    row = (
        await session.execute(
            _SESSION_AND_SENT,
            {"session_id": session_id, "team_id": team_id, "client_msg_id": client_msg_id},
        )
    ).first()
    if row is None:
        raise NotFound("session not found")
    return row[0], row[1]


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"


async def list_sessions(
    session: AsyncSession,
    *,
    team_id: str,
    limit: int,
    cursor: str | None,
    mode: str | None = None,
    archived: bool | None = None,
    q: str | None = None,
) -> Page[ChatSession]:
    stmt = select(ChatSession).where(
        ChatSession.team_id == team_id, ChatSession.deleted_at.is_(None)
    )
    if mode is not None:
        stmt = stmt.where(ChatSession.mode == mode)
    if archived is not None:
        stmt = stmt.where(ChatSession.archived == archived)
    if q:
        stmt = stmt.where(func.lower(ChatSession.title).like(_like(q), escape="\\"))
    return await paginate(session, stmt, ChatSession.id, limit=limit, cursor=cursor)


async def update_session(session: AsyncSession, row: ChatSession, **changes: Any) -> ChatSession:
    for name, value in changes.items():
        setattr(row, name, value)
    row.updated_at = utcnow()
    await session.flush()
    return row


async def delete_session(session: AsyncSession, row: ChatSession) -> None:
    row.deleted_at = utcnow()
    await session.flush()


async def set_last_seq(session: AsyncSession, *, session_id: str, seq: int) -> None:
    """Raise ``last_seq`` to ``seq`` (never lowers it)."""
    await session.execute(_RAISE_LAST_SEQ, {"session_id": session_id, "seq": seq})


async def reply_ended(session: AsyncSession, *, session_id: str, seq: int, at: datetime) -> None:
    """A reply of the session ended as its event ``seq``, at ``at``: raise
    its ``last_seq`` and ``last_message_at`` to them (never lowers either),
    in one statement."""
    await session.execute(_REPLY_ENDED, {"session_id": session_id, "seq": seq, "at": at})


async def list_messages(
    session: AsyncSession,
    *,
    team_id: str,
    session_id: str,
    limit: int,
    cursor: str | None,
    role: str | None = None,
) -> Page[Message]:
    stmt = select(Message).where(Message.team_id == team_id, Message.session_id == session_id)
    if role is not None:
        stmt = stmt.where(Message.role == role)
    return await paginate(session, stmt, Message.id, limit=limit, cursor=cursor, descending=False)


async def find_by_client_msg_id(
    session: AsyncSession, *, session_id: str, client_msg_id: str
) -> Message | None:
    return await session.scalar(
        _BY_CLIENT_MSG_ID, {"session_id": session_id, "client_msg_id": client_msg_id}
    )


async def add_user_message(
    session: AsyncSession,
    *,
    team_id: str,
    session_id: str,
    content: str,
    client_msg_id: str,
    author_id: str | None,
    mode: str,
    file_ids: list[str] | None = None,
    message_id: str | None = None,
) -> tuple[Message, bool]:
    """Store a user message; returns ``(message, created)``. A second call with
    the same ``client_msg_id`` returns the stored message and ``False``."""
    existing = await find_by_client_msg_id(
        session, session_id=session_id, client_msg_id=client_msg_id
    )
    if existing is not None:
        return existing, False
    message = Message(
        id=message_id or new_id(),
        team_id=team_id,
        session_id=session_id,
        role="user",
        content=content,
        status="complete",
        client_msg_id=client_msg_id,
        author_id=author_id,
        mode=mode,
        file_ids={"ids": file_ids} if file_ids else None,
    )
    try:
        async with session.begin_nested():
            session.add(message)
            await session.flush()
    except IntegrityError:
        existing = await find_by_client_msg_id(
            session, session_id=session_id, client_msg_id=client_msg_id
        )
        if existing is None:
            raise
        return existing, False
    return message, True


async def add_turn(
    session: AsyncSession,
    *,
    team_id: str,
    session_id: str,
    content: str,
    client_msg_id: str,
    author_id: str | None,
    mode: str,
    model: str,
    file_ids: list[str] | None,
    message_id: str,
    reply_id: str,
) -> dict[str, Any]:
    """Store a user message and the empty, streaming reply to it, in one
    statement; returns the user message's row. A ``client_msg_id`` already
    stored in the session (a concurrent send of the same message) raises
    :class:`IntegrityError`, which spoils the transaction: the caller looks
    the message up in a new one."""
    now = utcnow()
    common = {
        "team_id": team_id,
        "session_id": session_id,
        "mode": mode,
        "stop_reason": None,
        "usage": None,
        "trace": None,
        "created_at": now,
    }
    user = {
        **common,
        "id": message_id,
        "role": "user",
        "content": content,
        "status": "complete",
        "client_msg_id": client_msg_id,
        "reply_to": None,
        "author_id": author_id,
        "model": None,
        "file_ids": {"ids": file_ids} if file_ids else None,
        "completed_at": None,
    }
    reply = {
        **common,
        "id": reply_id,
        "role": "assistant",
        "content": "",
        "status": "streaming",
        "client_msg_id": None,
        "reply_to": message_id,
        "author_id": None,
        "model": model,
        "file_ids": None,
        "completed_at": None,
    }
    await session.execute(_INSERT_MESSAGES, [user, reply])
    return user


async def finish_reply_message(
    session: AsyncSession,
    *,
    message_id: str,
    content: str,
    status: str,
    stop_reason: str | None,
    usage: dict[str, Any] | None,
    trace: dict[str, Any] | None = None,
) -> Row[Any] | None:
    """Set the final text once and return the finished reply's row, read back
    in the same statement; a reply already finished is left as it is (then
    this returns None)."""
    result = await session.execute(
        _FINISH_REPLY,
        {
            "message_id": message_id,
            "new_content": content,
            "new_status": status,
            "new_stop_reason": stop_reason,
            "new_usage": usage,
            "new_trace": trace,
            "new_completed_at": utcnow(),
        },
    )
    return result.first()


async def finished_as(
    session: AsyncSession, *, message_id: str, content: str, stop_reason: str
) -> Message | None:
    """The reply, if it has ended with this text and stop reason."""
    row = await session.get(Message, message_id, populate_existing=True)
    if row is None or row.status == "streaming":
        return None
    return row if (row.content, row.stop_reason) == (content, stop_reason) else None


async def checkpoint_reply(session: AsyncSession, *, message_id: str, content: str) -> bool:
    """Store the text a reply has streamed so far, while it still streams
    (never over a finished reply's text). True when it was stored."""
    result = await session.execute(
        _CHECKPOINT_REPLY, {"message_id": message_id, "new_content": content}
    )
    return rowcount(result) > 0


async def reply_by_id(session: AsyncSession, *, reply_id: str) -> Message | None:
    """A reply by id whatever its team: for the reaper, which knows a reply
    only by the lease it left behind. Never reachable from a request."""
    return await session.scalar(
        select(Message).where(Message.id == reply_id, Message.role == "assistant")
    )


async def content_of(session: AsyncSession, *, message_id: str) -> str | None:
    """A message's text whatever its team (for the reaper)."""
    content: str | None = await session.scalar(
        select(Message.content).where(Message.id == message_id)
    )
    return content


async def stored_last_seq(session: AsyncSession, *, session_id: str) -> int:
    """The session's stored ``last_seq`` whatever its team (for the reaper)."""
    return int(
        await session.scalar(select(ChatSession.last_seq).where(ChatSession.id == session_id)) or 0
    )


async def unfinished_replies(
    session: AsyncSession, *, started_before: datetime | None = None, limit: int = 100
) -> list[Message]:
    """Replies still marked as streaming (of every team: for the reaper)."""
    stmt = select(Message).where(Message.status == "streaming", Message.role == "assistant")
    if started_before is not None:
        stmt = stmt.where(Message.created_at < started_before)
    return list((await session.scalars(stmt.order_by(Message.id).limit(limit))).all())


async def streaming_replies(session: AsyncSession, *, session_id: str) -> list[str]:
    """The ids of the session's replies still marked as streaming: the one
    being generated, if any (and one a dead server left, until it is reaped)."""
    rows = await session.scalars(
        select(Message.id).where(
            Message.session_id == session_id,
            Message.role == "assistant",
            Message.status == "streaming",
        )
    )
    return list(rows.all())


async def get_message(session: AsyncSession, *, team_id: str, message_id: str) -> Message:
    row = await session.scalar(
        select(Message).where(Message.id == message_id, Message.team_id == team_id)
    )
    if row is None:
        raise NotFound("message not found")
    return row


async def reply_for(session: AsyncSession, *, user_message_id: str) -> Message | None:
    return await session.scalar(
        select(Message).where(Message.reply_to == user_message_id, Message.role == "assistant")
    )


async def recent_messages(
    session: AsyncSession, *, session_id: str, limit: int, before_id: str | None = None
) -> list[Message]:
    """The newest ``limit`` finished messages, oldest first."""
    stmt = select(Message).where(
        Message.session_id == session_id,
        or_(Message.status != "streaming", Message.role == "user"),
    )
    if before_id is not None:
        stmt = stmt.where(Message.id < before_id)
    rows = (await session.scalars(stmt.order_by(Message.id.desc()).limit(limit))).all()
    return list(reversed(rows))
