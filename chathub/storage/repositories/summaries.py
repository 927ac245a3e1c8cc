"""Rolling summaries of sessions: immutable versions, newest wins; and the
reads of a session's history that summaries and extraction make."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Integer, Row, Select, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.storage.db import rowcount
from chathub.storage.models import ChatSession, Message, SessionSummary

# Read on every chat turn: built once (see repositories.sessions).
_LATEST = (
    select(SessionSummary)
    .where(SessionSummary.session_id == bindparam("session_id"))
    .order_by(SessionSummary.version.desc())
    .limit(1)
)


def _history(after: bool, newest: bool) -> Select[str, str, str]:
    stmt = select(Message.id, Message.role, Message.content).where(
        Message.session_id == bindparam("session_id"), Message.status != "streaming"
    )
    if after:
        stmt = stmt.where(Message.id > bindparam("after_id"))
    order = Message.id.desc() if newest else Message.id
    return stmt.order_by(order).limit(bindparam("limit", type_=Integer))


_HISTORY = {
    (after, newest): _history(after, newest) for after in (False, True) for newest in (False, True)
}


async def latest(db: AsyncSession, *, session_id: str) -> SessionSummary | None:
    return await db.scalar(_LATEST, {"session_id": session_id})


async def add(
    db: AsyncSession, *, team_id: str, session_id: str, text: str, covers_until: str
) -> SessionSummary:
    """Append the next version. Raises IntegrityError if another writer won."""
    current = await latest(db, session_id=session_id)
    row = SessionSummary(
        team_id=team_id,
        session_id=session_id,
        version=(current.version + 1) if current else 1,
        text=text,
        covers_until=covers_until,
    )
    db.add(row)
    await db.flush()
    return row


async def history_after(
    db: AsyncSession, *, session_id: str, after_id: str | None, limit: int, newest: bool = True
) -> Sequence[Row[str, str, str]]:
    """``limit`` finished messages after ``after_id`` (the newest ones, or the
    oldest with ``newest=False``), oldest first, as ``(id, role, content)``."""
    params: dict[str, object] = {"session_id": session_id, "limit": limit}
    if after_id is not None:
        params["after_id"] = after_id
    rows = (await db.execute(_HISTORY[after_id is not None, newest], params)).all()
    return rows[::-1] if newest else rows


_LIVE_SESSION = (
    ChatSession.id == bindparam("session_id"),
    ChatSession.team_id == bindparam("team_id"),
    ChatSession.deleted_at.is_(None),
)
_EXTRACTED_UNTIL = select(ChatSession.extracted_until).where(*_LIVE_SESSION)
_EXTRACTION_BATCH = (
    select(Message.id, Message.role, Message.content, Message.mode)
    .where(
        Message.session_id == bindparam("session_id"),
        Message.team_id == bindparam("team_id"),
        Message.status != "streaming",
        Message.id > bindparam("after_id"),
    )
    .order_by(Message.id)
    .limit(bindparam("limit", type_=Integer))
)


async def extraction_batch(
    db: AsyncSession, *, team_id: str, session_id: str, limit: int
) -> tuple[str | None, Sequence[Row[str, str, str, str | None]]]:
    """Where extraction of the session stands (the last message it read;
    None: none yet) and the oldest ``limit`` finished messages after that,
    oldest first, as ``(id, role, content, mode)``. No messages when the
    session is deleted or not ``team_id``'s."""
    params: dict[str, object] = {"team_id": team_id, "session_id": session_id}
    position = (await db.execute(_EXTRACTED_UNTIL, params)).first()
    if position is None:
        return None, []
    after = position.extracted_until
    params |= {"after_id": after or "", "limit": limit}  # every id sorts after ""
    return after, (await db.execute(_EXTRACTION_BATCH, params)).all()


async def mark_extracted(
    db: AsyncSession, *, team_id: str, session_id: str, after_id: str | None, until: str
) -> bool:
    """Move where extraction of the session stands from ``after_id`` to
    ``until``. False, changing nothing, when it no longer stands at
    ``after_id`` (another run read these messages first) or the session is
    deleted or not ``team_id``'s. On PostgreSQL the session's row stays
    locked until ``db`` commits, so of two runs only one moves it."""
    stands = (
        ChatSession.extracted_until.is_(None)
        if after_id is None
        else ChatSession.extracted_until == after_id
    )
    result = await db.execute(
        update(ChatSession)
        .where(
            ChatSession.id == session_id,
            ChatSession.team_id == team_id,
            ChatSession.deleted_at.is_(None),
            stands,
        )
        .values(extracted_until=until)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1
