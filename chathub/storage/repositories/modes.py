"""Team-defined modes. The shipped ones come from the package; a team's own
never shadow them."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.errors import Conflict, Forbidden, NotFound
from chathub.llm.modes import Mode, get_mode, shipped_modes
from chathub.storage.locks import advisory_xact_lock
from chathub.storage.models import ChatSession, TeamMode, utcnow

ModeSource = Literal["shipped", "team"]


async def resolve_mode(db: AsyncSession, *, team_id: str, name: str) -> Mode | None:
    """The mode called ``name`` for this team: shipped, else the team's own."""
    shipped = get_mode(name)
    if shipped is not None:
        return shipped
    row = await _row(db, team_id=team_id, name=name)
    return Mode.model_validate(row.spec) if row is not None else None


async def _row(db: AsyncSession, *, team_id: str, name: str) -> TeamMode | None:
    return await db.scalar(
        select(TeamMode).where(TeamMode.team_id == team_id, TeamMode.name == name)
    )


async def lock_mode(db: AsyncSession, *, team_id: str, name: str) -> None:
    """Hold the team mode ``name`` until ``db``'s transaction ends, across
    every process sharing the database. Taken by whatever deletes the mode
    and by whatever puts a session in it (create, change of mode): the one
    that comes second sees what the first committed, so a session is never
    left in a mode deleted at the same time. Shipped modes are never
    deleted: there is nothing to lock."""
    if get_mode(name) is not None:
        return
    await advisory_xact_lock(db, f"chathub:mode:{team_id}:{name}")


async def list_modes(db: AsyncSession, *, team_id: str) -> list[tuple[Mode, ModeSource]]:
    """Every mode the team can use, with its source (``shipped`` or ``team``)."""
    rows = await db.scalars(
        select(TeamMode).where(TeamMode.team_id == team_id).order_by(TeamMode.name)
    )
    out: list[tuple[Mode, ModeSource]] = [(m, "shipped") for m in shipped_modes().values()]
    out += [(Mode.model_validate(row.spec), "team") for row in rows]
    return out


async def create_mode(db: AsyncSession, *, team_id: str, mode: Mode, created_by: str) -> Mode:
    if mode.name in shipped_modes():
        raise Conflict(f"{mode.name!r} is a shipped mode")
    if await _row(db, team_id=team_id, name=mode.name) is not None:
        raise Conflict(f"mode {mode.name!r} exists")
    db.add(
        TeamMode(
            team_id=team_id,
            name=mode.name,
            spec=mode.model_dump(mode="json", by_alias=True),
            created_by=created_by,
        )
    )
    try:
        async with db.begin_nested():
            await db.flush()
    except IntegrityError as exc:
        raise Conflict(f"mode {mode.name!r} exists") from exc
    return mode


async def replace_mode(db: AsyncSession, *, team_id: str, mode: Mode) -> Mode:
    if mode.name in shipped_modes():
        raise Forbidden("shipped modes cannot be changed")
    row = await _row(db, team_id=team_id, name=mode.name)
    if row is None:
        raise NotFound("mode not found")
    row.spec = mode.model_dump(mode="json", by_alias=True)
    row.updated_at = utcnow()
    await db.flush()
    return mode


async def delete_mode(db: AsyncSession, *, team_id: str, name: str) -> None:
    if name in shipped_modes():
        raise Forbidden("shipped modes cannot be deleted")
    # Before counting: a session being put in this mode either committed
    # and is counted, or waits and then finds the mode gone.
    await lock_mode(db, team_id=team_id, name=name)
    row = await _row(db, team_id=team_id, name=name)
    if row is None:
        raise NotFound("mode not found")
    in_use = await db.scalar(
        select(func.count())
        .select_from(ChatSession)
        .where(
            ChatSession.team_id == team_id,
            ChatSession.mode == name,
            ChatSession.deleted_at.is_(None),
        )
    )
    if in_use:
        # Their next message would find no mode: move them first.
        raise Conflict(
            f"{in_use} session(s) use mode {name!r}; change their mode before deleting it",
            sessions=in_use,
        )
    await db.delete(row)
    await db.flush()
