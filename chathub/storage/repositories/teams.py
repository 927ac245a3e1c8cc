"""Teams, members and API keys.

Two invariants live here rather than in the routes, so every caller keeps them:

- a team always has at least one owner: demoting or removing its last owner
  raises :class:`Conflict`, also when two such changes race;
- an API key never outranks its member: demoting a member lowers their keys.

Changes to a member are conditional on the role the caller read, so a
permission check made on that role cannot be overtaken by a concurrent
promotion; the loser gets :class:`Conflict` and may read again and retry.
Locks are taken in one order: the target member's keys, the team row, the
member row. Should two changes still cross (PostgreSQL aborts one of a
deadlocked pair), the aborted one gets :class:`Conflict` too, never a 500.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.auth import ROLE_RANK, ROLES, generate_api_key, hash_api_key
from chathub.errors import BadRequest, Conflict, NotFound
from chathub.storage.db import rowcount
from chathub.storage.models import ApiKey, Member, Team, utcnow
from chathub.storage.pagination import Page, paginate

OWNER = "owner"

EMAIL_MAX_LENGTH = 254
# Deliberately loose: one "@", no spaces, a dot in the domain. Deliverability
# is the inviter's business; this only refuses what cannot be an address.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f.]+(\.[^@\s\x00-\x1f\x7f.]+)+$")


def normalize_email(email: str) -> str:
    """The form in which an email is stored and compared: lower-cased.
    ValueError when it is not an address, or is longer than
    ``EMAIL_MAX_LENGTH`` once lower-cased (a few characters lower-case to
    two: "İ" becomes "i" and a combining dot)."""
    lowered = email.lower()
    if not _EMAIL.match(lowered):
        raise ValueError("not an email address")
    if len(lowered) > EMAIL_MAX_LENGTH:
        raise ValueError(f"longer than {EMAIL_MAX_LENGTH} characters once lower-cased")
    return lowered


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
    """Add a member; emails are compared case-insensitively (stored lowercased,
    see :func:`normalize_email`, whose refusal is :class:`BadRequest`).
    An email already in the team raises :class:`Conflict`."""
    try:
        email = normalize_email(email)
    except ValueError as exc:
        raise BadRequest(f"email: {exc}") from exc
    existing = await session.scalar(
        select(Member.id).where(Member.team_id == team_id, Member.email == email)
    )
    if existing is not None:
        raise Conflict("a member with this email already exists")
    member = Member(team_id=team_id, email=email, name=name, role=role)
    session.add(member)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent add of the same email won
        raise Conflict("a member with this email already exists") from exc
    return member


async def get_member(
    session: AsyncSession, *, team_id: str, member_id: str, for_update: bool = False
) -> Member:
    """The live member; ``for_update`` locks their row until the transaction
    ends (PostgreSQL), so that changes of their role and of their keys are
    made one after the other."""
    query = select(Member).where(
        Member.id == member_id, Member.team_id == team_id, Member.deleted_at.is_(None)
    )
    if for_update:
        query = query.with_for_update()
    member = await session.scalar(query)
    if member is None:
        raise NotFound("member not found")
    return member


async def list_members(
    session: AsyncSession, *, team_id: str, limit: int, cursor: str | None, role: str | None = None
) -> Page[Member]:
    """The team's members, oldest first."""
    stmt = select(Member).where(Member.team_id == team_id, Member.deleted_at.is_(None))
    if role is not None:
        stmt = stmt.where(Member.role == role)
    return await paginate(session, stmt, Member.id, limit=limit, cursor=cursor, descending=False)


async def count_owners(session: AsyncSession, *, team_id: str) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(Member)
        .where(Member.team_id == team_id, Member.role == OWNER, Member.deleted_at.is_(None))
    )
    return int(count or 0)


async def lock_team(session: AsyncSession, team_id: str) -> None:
    """Hold the team's row until commit, serialising changes to its owners.

    A no-op write rather than ``SELECT ... FOR UPDATE``: on PostgreSQL it locks
    the row without blocking inserts that reference it, and it means the same
    on SQLite, which ignores ``FOR UPDATE`` (and serialises writers anyway)."""
    await session.execute(update(Team).where(Team.id == team_id).values(name=Team.name))


async def _keep_another_owner(session: AsyncSession, member: Member) -> None:
    """Raise :class:`Conflict` unless an owner other than ``member`` remains."""
    await lock_team(session, member.team_id)
    others = await session.scalar(
        select(func.count())
        .select_from(Member)
        .where(
            Member.team_id == member.team_id,
            Member.role == OWNER,
            Member.id != member.id,
            Member.deleted_at.is_(None),
        )
    )
    if not others:
        raise Conflict("a team needs at least one owner: make another member owner first")


def _changed_meanwhile() -> Conflict:
    return Conflict("the member was changed by someone else meanwhile; read it again and retry")


# deadlock_detected, serialization_failure
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


@contextmanager
def _races_are_conflicts() -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
            raise _changed_meanwhile() from exc
        raise


async def update_member(
    session: AsyncSession, member: Member, *, name: str | None = None, role: str | None = None
) -> Member:
    """Change a member's name and/or role; ``None`` leaves a field as it is.

    Demoting a member lowers their API keys to the new role. Raises
    :class:`Conflict` when this would demote the team's last owner, or when
    the member's role changed since ``member`` was read."""
    values: dict[str, str] = {}
    if name is not None and name != member.name:
        values["name"] = name
    if role is not None and role != member.role:
        values["role"] = role
    if not values:
        return member
    with _races_are_conflicts():
        await _apply_member_change(session, member, values)
    await session.refresh(member)
    return member


async def _apply_member_change(
    session: AsyncSession, member: Member, values: dict[str, str]
) -> None:
    seen_role = member.role
    role = values.get("role")
    if role is not None and ROLE_RANK[role] < ROLE_RANK[seen_role]:
        above = [r for r in ROLES if ROLE_RANK[r] > ROLE_RANK[role]]
        await session.execute(
            update(ApiKey)
            .where(ApiKey.member_id == member.id, ApiKey.role.in_(above))
            .values(role=role)
            .execution_options(synchronize_session=False)
        )
        if seen_role == OWNER:
            await _keep_another_owner(session, member)
    result = await session.execute(
        update(Member)
        .where(
            Member.id == member.id,
            Member.team_id == member.team_id,
            Member.role == seen_role,
            Member.deleted_at.is_(None),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 0:
        raise _changed_meanwhile()


async def remove_member(session: AsyncSession, member: Member) -> None:
    """Delete the member and every API key of theirs. Their keys and JWTs stop
    working at once: each request checks the key and the member still exist.

    Raises :class:`Conflict` when ``member`` is the team's last owner, or when
    the member's role changed since it was read."""
    seen_role = member.role
    with _races_are_conflicts():
        await session.execute(
            delete(ApiKey)
            .where(ApiKey.member_id == member.id)
            .execution_options(synchronize_session=False)
        )
        if seen_role == OWNER:
            await _keep_another_owner(session, member)
        try:
            result = await session.execute(
                delete(Member)
                .where(
                    Member.id == member.id,
                    Member.team_id == member.team_id,
                    Member.role == seen_role,
                )
                .execution_options(synchronize_session=False)
            )
        except IntegrityError as exc:  # a key was created for them concurrently
            raise _changed_meanwhile() from exc
    if rowcount(result) == 0:
        raise _changed_meanwhile()
    session.expunge(member)


async def create_api_key(
    session: AsyncSession, *, team_id: str, member_id: str, name: str, role: str
) -> CreatedKey:
    """A new key acting as ``member_id`` with ``role``; the secret is returned
    here and never stored, only its SHA-256."""
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
    try:
        await session.flush()
    except IntegrityError as exc:  # the member was removed concurrently
        raise NotFound("member not found") from exc
    return CreatedKey(row=row, secret=new.secret)


async def list_api_keys(
    session: AsyncSession, *, team_id: str, limit: int, cursor: str | None
) -> Page[ApiKey]:
    """The team's live (unrevoked) keys, oldest first."""
    stmt = select(ApiKey).where(ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None))
    return await paginate(session, stmt, ApiKey.id, limit=limit, cursor=cursor, descending=False)


async def get_api_key(session: AsyncSession, *, team_id: str, key_id: str) -> ApiKey:
    """A live key of the team; revoked keys are not found."""
    row = await session.scalar(
        select(ApiKey).where(
            ApiKey.id == key_id, ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None)
        )
    )
    if row is None:
        raise NotFound("api key not found")
    return row


async def revoke_api_key(session: AsyncSession, row: ApiKey) -> None:
    """Revoke a key for good; the row stays, without a usable secret."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 0:  # revoked (or removed with its member) meanwhile
        raise NotFound("api key not found")
    await session.refresh(row)


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
    return await current_role(session, team_id=team_id, member_id=member_id) is not None


async def current_role(
    session: AsyncSession, *, team_id: str, member_id: str, api_key_id: str | None = None
) -> str | None:
    """The role a token of this member (and key) may still use now: the
    lower of the member's and the key's; None when either is gone."""
    roles = await current_roles(session, team_id=team_id, credentials=[(member_id, api_key_id)])
    return roles[member_id, api_key_id]


async def current_roles(
    session: AsyncSession,
    *,
    team_id: str,
    credentials: Collection[tuple[str, str | None]],
) -> dict[tuple[str, str | None], str | None]:
    """:func:`current_role` of each (member, key) pair of ``team_id``, in two
    statements whatever their number."""
    member_ids = {member for member, _ in credentials}
    key_ids = {key for _, key in credentials if key is not None}
    members = dict(
        (
            await session.execute(
                select(Member.id, Member.role).where(
                    Member.id.in_(member_ids),
                    Member.team_id == team_id,
                    Member.deleted_at.is_(None),
                )
            )
        ).all()
    )
    keys: dict[str, tuple[str, str]] = {}
    if key_ids:
        rows = await session.execute(
            select(ApiKey.id, ApiKey.member_id, ApiKey.role).where(
                ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_(None)
            )
        )
        keys = {key_id: (member, role) for key_id, member, role in rows.all()}
    roles: dict[tuple[str, str | None], str | None] = {}
    for member_id, key_id in credentials:
        role = members.get(member_id)
        if role is not None and key_id is not None:
            key = keys.get(key_id)
            role = (
                min(role, key[1], key=ROLE_RANK.__getitem__)
                if key is not None and key[0] == member_id
                else None
            )
        roles[member_id, key_id] = role
    return roles
