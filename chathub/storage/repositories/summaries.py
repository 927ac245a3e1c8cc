"""Rolling summaries of sessions: immutable versions, newest wins."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Integer, Row, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.storage.models import Message, SessionSummary

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
