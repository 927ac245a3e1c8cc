"""Teams, members and API keys."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.auth import generate_api_key, hash_api_key
from chathub.errors import Conflict, NotFound
from chathub.storage.models import ApiKey, Member, Team, utcnow
from chathub.storage.pagination import Page, paginate


@dataclass(frozen=True)
class CreatedKey:
    row: ApiKey
    secret: str


async def create_team(session: AsyncSession, *, name: str) -> Team:
    team = Team(name=name)
    session.add(team)
    await session.flush()
    return team


async def get_team(session: AsyncSession, team_id: str) -> Team:
    team = await session.get(Team, team_id)
    if team is None:
        raise NotFound("team not found")
    return team


async def add_member(
    session: AsyncSession, *, team_id: str, email: str, name: str, role: str
) -> Member:
    existing = await session.scalar(
        select(Member).where(Member.team_id == team_id, Member.email == email.lower())
    )
    if existing is not None:
        raise Conflict("a member with this email already exists")
    member = Member(team_id=team_id, email=email.lower(), name=name, role=role)
    session.add(member)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("a member with this email already exists") from exc
    return member


async def get_member(session: AsyncSession, *, team_id: str, member_id: str) -> Member:
    member = await session.scalar(
        select(Member).where(
            Member.id == member_id, Member.team_id == team_id, Member.deleted_at.is_(None)
        )
    )
    if member is None:
        raise NotFound("member not found")
    return member


async def list_members(
    session: AsyncSession, *, team_id: str, limit: int, cursor: str | None, role: str | None = None
) -> Page[Member]:
    stmt = select(Member).where(Member.team_id == team_id, Member.deleted_at.is_(None))
    if role is not None:
        stmt = stmt.where(Member.role == role)
    return await paginate(session, stmt, Member.id, limit=limit, cursor=cursor, descending=False)


async def count_owners(session: AsyncSession, *, team_id: str) -> int:
    rows = await session.scalars(
        select(Member.id).where(
            Member.team_id == team_id, Member.role == "owner", Member.deleted_at.is_(None)
        )
    )
    return len(rows.all())


async def remove_member(session: AsyncSession, member: Member) -> None:
    """Deletes the member and every key they created; their tokens stop
    working at once because each request checks the member still exists."""
    await session.execute(delete(ApiKey).where(ApiKey.member_id == member.id))
    await session.delete(member)
    await session.flush()


async def create_api_key(
    session: AsyncSession, *, team_id: str, member_id: str, name: str, role: str
) -> CreatedKey:
    new = generate_api_key()
    row = ApiKey(
        team_id=team_id,
        member_id=member_id,
        name=name,
        role=role,
        prefix=new.prefix,
        key_hash=new.key_hash,
    )
    session.add(row)
    await session.flush()
    return CreatedKey(row=row, secret=new.secret)


async def list_api_keys(
    session: AsyncSession, *, team_id: str, limit: int, cursor: str | None
) -> Page[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None))
    return await paginate(session, stmt, ApiKey.id, limit=limit, cursor=cursor, descending=False)


async def get_api_key(session: AsyncSession, *, team_id: str, key_id: str) -> ApiKey:
    row = await session.scalar(
        select(ApiKey).where(
            ApiKey.id == key_id, ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None)
        )
    )
    if row is None:
        raise NotFound("api key not found")
    return row


async def revoke_api_key(session: AsyncSession, row: ApiKey) -> None:
    row.revoked_at = utcnow()
    await session.flush()


async def find_active_key(session: AsyncSession, secret: str) -> tuple[ApiKey, Member] | None:
    """The live key with this secret and its live member, or None."""
    row = await session.execute(
        select(ApiKey, Member)
        .join(Member, Member.id == ApiKey.member_id)
        .where(
            ApiKey.key_hash == hash_api_key(secret),
            ApiKey.revoked_at.is_(None),
            Member.deleted_at.is_(None),
        )
    )
    found = row.first()
    if found is None:
        return None
    return found[0], found[1]


async def touch_api_key(session: AsyncSession, key_id: str) -> None:
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))


async def member_is_active(session: AsyncSession, *, team_id: str, member_id: str) -> bool:
    found = await session.scalar(
        select(Member.id).where(
            Member.id == member_id, Member.team_id == team_id, Member.deleted_at.is_(None)
        )
    )
    return found is not None
