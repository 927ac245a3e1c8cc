"""Rolling summaries of sessions: immutable versions, newest wins."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.storage.models import Message, SessionSummary


async def latest(db: AsyncSession, *, session_id: str) -> SessionSummary | None:
    return await db.scalar(
        select(SessionSummary)
        .where(SessionSummary.session_id == session_id)
        .order_by(SessionSummary.version.desc())
        .limit(1)
    )


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
) -> list[Message]:
    """``limit`` finished messages after ``after_id`` (the newest ones, or the
    oldest with ``newest=False``), oldest first."""
    stmt = select(Message).where(Message.session_id == session_id, Message.status != "streaming")
    if after_id is not None:
        stmt = stmt.where(Message.id > after_id)
    if not newest:
        return list((await db.scalars(stmt.order_by(Message.id).limit(limit))).all())
    rows = (await db.scalars(stmt.order_by(Message.id.desc()).limit(limit))).all()
    return list(reversed(rows))
