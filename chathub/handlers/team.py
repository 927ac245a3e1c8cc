"""``/team``: the team's members and API keys.

Who may do what (the caller's role is the role of the key or token it presents):

- Any member of the team, viewers included, may read the member list and
  one member: a chat UI shows who is who.
- Admins and owners add, change and remove members. Nobody acts on a member
  who outranks them or grants a role above their own: an admin cannot touch
  an owner nor make one; only owners create or promote owners.
- A team keeps at least one owner: demoting or removing the last one is
  ``409 conflict``.
- Admins and owners manage the team's API keys: they list every live key
  (never a secret), create keys for themselves or for any member who does not
  outrank them, and revoke such members' keys. A key's role is at most the
  caller's role and at most its member's role; it defaults to the lower of
  the two. The secret is returned once, by the POST; only its hash is stored.
- Removing a member deletes their keys; their keys and JWTs stop working on
  the next request. Demoting a member lowers their keys to the new role.

Every change writes an audit event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Query
from pydantic import Field, field_validator
from starlette.responses import Response

from chathub.auth import ROLE_RANK, Principal
from chathub.errors import BadRequest, Forbidden
from chathub.handlers.deps import AdminUser, PageDep, SessionDep, StateDep, Viewer
from chathub.handlers.schemas import Out, Page, StrictBody, errors
from chathub.server.state import AppState
from chathub.storage.models import ApiKey, Member
from chathub.storage.repositories import audit
from chathub.storage.repositories import teams as repo

router = APIRouter(prefix="/team", tags=["team"])

Role = Literal["viewer", "member", "admin", "owner"]


class MemberOut(Out):
    id: str
    email: str
    name: str
    role: str
    created_at: datetime


class MemberCreate(StrictBody):
    email: str = Field(max_length=repo.EMAIL_MAX_LENGTH)
    name: str = Field(default="", max_length=200)
    role: Role = "member"

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return repo.normalize_email(value)


class MemberPatch(StrictBody):
    name: str | None = Field(default=None, max_length=200)
    role: Role | None = None


class ApiKeyOut(Out):
    id: str
    name: str
    role: str
    prefix: str
    member_id: str
    created_at: datetime
    last_used_at: datetime | None


class CreatedApiKeyOut(ApiKeyOut):
    api_key: str = Field(description="the secret: shown in this response only, never again")


class ApiKeyCreate(StrictBody):
    name: str = Field(min_length=1, max_length=200)
    role: Role | None = Field(
        default=None, description="at most the caller's and the member's role (default)"
    )
    member_id: str | None = Field(
        default=None, max_length=64, description="whose key this is; the caller by default"
    )


def _outranks(role: str, principal: Principal) -> bool:
    return ROLE_RANK[role] > ROLE_RANK[principal.role]


def _may_act_on(member: Member, principal: Principal, doing: str) -> None:
    if _outranks(member.role, principal):
        raise Forbidden(f"only an {member.role} may {doing} an {member.role}")


def _may_grant(role: str, principal: Principal) -> None:
    if _outranks(role, principal):
        raise Forbidden(f"only an {role} may grant the {role} role")


def _member_view(member: Member) -> dict[str, str]:
    return {"email": member.email, "name": member.name, "role": member.role}


def _key_view(key: ApiKey) -> dict[str, str]:
    return {"name": key.name, "role": key.role, "prefix": key.prefix, "member_id": key.member_id}


def _announce(background: BackgroundTasks, state: AppState, team_id: str) -> None:
    """Once the route's transaction has committed (background tasks run after
    the response), every instance re-checks the team's open sockets."""
    background.add_task(state.credentials.changed, team_id)


# ---- members -------------------------------------------------------------------------


@router.get("/members", responses=errors())
async def list_members(
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    role: Annotated[Role | None, Query(description="only members with this role")] = None,
) -> Page[MemberOut]:
    """The team's members, oldest first."""
    result = await repo.list_members(
        db, team_id=principal.team_id, limit=page.limit, cursor=page.cursor, role=role
    )
    return Page(
        items=[MemberOut.model_validate(m) for m in result.items],
        next_cursor=result.next_cursor,
    )


@router.post("/members", status_code=201, responses=errors(403, 409))
async def add_member(body: MemberCreate, principal: AdminUser, db: SessionDep) -> MemberOut:
    """Add a member (admins; owners to add an owner). An email already in the
    team is ``409``. The member signs in with an API key made for them."""
    _may_grant(body.role, principal)
    member = await repo.add_member(
        db, team_id=principal.team_id, email=body.email, name=body.name, role=body.role
    )
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="member.add",
        target_type="member",
        target_id=member.id,
        data=_member_view(member),
    )
    return MemberOut.model_validate(member)


@router.get("/members/{member_id}", responses=errors(404))
async def get_member(member_id: str, principal: Viewer, db: SessionDep) -> MemberOut:
    member = await repo.get_member(db, team_id=principal.team_id, member_id=member_id)
    return MemberOut.model_validate(member)


@router.patch("/members/{member_id}", responses=errors(403, 404, 409))
async def patch_member(
    member_id: str,
    body: MemberPatch,
    principal: AdminUser,
    db: SessionDep,
    state: StateDep,
    background: BackgroundTasks,
) -> MemberOut:
    """Rename a member or change their role. Demoting the last owner is ``409``.
    Open sockets of a demoted member act with the new role from their next frame."""
    member = await repo.get_member(
        db, team_id=principal.team_id, member_id=member_id, for_update=True
    )
    _may_act_on(member, principal, "change")
    if body.role is not None:
        _may_grant(body.role, principal)
    before = _member_view(member)
    member = await repo.update_member(db, member, name=body.name, role=body.role)
    after = _member_view(member)
    if after["role"] != before["role"]:
        _announce(background, state, principal.team_id)
    if after != before:
        await audit.record(
            db,
            team_id=principal.team_id,
            actor_id=principal.member_id,
            action="member.update",
            target_type="member",
            target_id=member.id,
            data={
                "before": {k: v for k, v in before.items() if after[k] != v},
                "after": {k: v for k, v in after.items() if before[k] != v},
            },
        )
    return MemberOut.model_validate(member)


@router.delete("/members/{member_id}", status_code=204, responses=errors(403, 404, 409))
async def remove_member(
    member_id: str,
    principal: AdminUser,
    db: SessionDep,
    state: StateDep,
    background: BackgroundTasks,
) -> Response:
    """Remove a member and their API keys. Removing the last owner is ``409``.
    Their open sockets are closed (4401)."""
    member = await repo.get_member(
        db, team_id=principal.team_id, member_id=member_id, for_update=True
    )
    _may_act_on(member, principal, "remove")
    removed = {"id": member.id, **_member_view(member)}
    await repo.remove_member(db, member)
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="member.remove",
        target_type="member",
        target_id=removed["id"],
        data={k: v for k, v in removed.items() if k != "id"},
    )
    _announce(background, state, principal.team_id)
    return Response(status_code=204)


# ---- API keys ------------------------------------------------------------------------


@router.get("/api-keys", responses=errors(403))
async def list_api_keys(principal: AdminUser, db: SessionDep, page: PageDep) -> Page[ApiKeyOut]:
    """The team's live keys, oldest first. Secrets are never listed."""
    result = await repo.list_api_keys(
        db, team_id=principal.team_id, limit=page.limit, cursor=page.cursor
    )
    return Page(
        items=[ApiKeyOut.model_validate(k) for k in result.items],
        next_cursor=result.next_cursor,
    )


@router.post("/api-keys", status_code=201, responses=errors(403, 404))
async def create_api_key(
    body: ApiKeyCreate, principal: AdminUser, db: SessionDep
) -> CreatedApiKeyOut:
    """A new key; ``api_key`` in this response is the only time the secret is shown."""
    # Locked until the key is committed: a demotion of the member waits, and
    # then lowers this key with their others.
    member = await repo.get_member(
        db,
        team_id=principal.team_id,
        member_id=body.member_id or principal.member_id,
        for_update=True,
    )
    _may_act_on(member, principal, "create keys for")
    if body.role is None:
        role = min(member.role, principal.role, key=ROLE_RANK.__getitem__)
    else:
        role = body.role
        _may_grant(role, principal)
        if ROLE_RANK[role] > ROLE_RANK[member.role]:
            raise BadRequest(f"role: a key cannot outrank its member, who is {member.role}")
    created = await repo.create_api_key(
        db, team_id=principal.team_id, member_id=member.id, name=body.name, role=role
    )
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="api_key.create",
        target_type="api_key",
        target_id=created.row.id,
        data=_key_view(created.row),
    )
    out = ApiKeyOut.model_validate(created.row)
    return CreatedApiKeyOut(**out.model_dump(), api_key=created.secret)


@router.delete("/api-keys/{key_id}", status_code=204, responses=errors(403, 404))
async def revoke_api_key(
    key_id: str,
    principal: AdminUser,
    db: SessionDep,
    state: StateDep,
    background: BackgroundTasks,
) -> Response:
    """Revoke a key: from now on it is refused everywhere, ``/auth/token``
    included, and the sockets open with it (or with a token issued for it)
    are closed (4401). A key already revoked is ``404``."""
    key = await repo.get_api_key(db, team_id=principal.team_id, key_id=key_id)
    owner = await repo.get_member(db, team_id=principal.team_id, member_id=key.member_id)
    _may_act_on(owner, principal, "revoke keys of")
    await repo.revoke_api_key(db, key)
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="api_key.revoke",
        target_type="api_key",
        target_id=key.id,
        data=_key_view(key),
    )
    _announce(background, state, principal.team_id)
    return Response(status_code=204)
