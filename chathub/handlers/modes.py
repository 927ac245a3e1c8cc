"""``/modes``: the shipped modes and the team's own (an addition to the
contract). Admins create, replace and delete the team's modes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from chathub.errors import BadRequest, NotFound
from chathub.handlers.deps import AdminUser, SessionDep, StateDep, Viewer
from chathub.handlers.schemas import errors
from chathub.llm.modes import Mode
from chathub.server.state import AppState
from chathub.storage.repositories import audit
from chathub.storage.repositories import modes as repo

router = APIRouter(prefix="/modes", tags=["modes"])


class ModeOut(Mode):
    source: Literal["shipped", "team"]


class ModeList(BaseModel):
    items: list[ModeOut]
    next_cursor: None = None


def _out(mode: Mode, source: Literal["shipped", "team"]) -> ModeOut:
    return ModeOut(**mode.model_dump(by_alias=True), source=source)


@router.get("", responses=errors())
async def list_modes(principal: Viewer, db: SessionDep) -> ModeList:
    """Every mode the team can use: shipped first, then its own by name."""
    return ModeList(
        items=[_out(m, s) for m, s in await repo.list_modes(db, team_id=principal.team_id)]
    )


@router.get("/{name}", responses=errors(404))
async def get_mode(name: str, principal: Viewer, db: SessionDep) -> ModeOut:
    for mode, source in await repo.list_modes(db, team_id=principal.team_id):
        if mode.name == name:
            return _out(mode, source)
    raise NotFound("mode not found")


def _check_provider(mode: Mode, state: AppState) -> None:
    if mode.provider not in (None, "default", *state.settings.llm_providers):
        known = ", ".join(["default", *state.settings.llm_providers])
        raise BadRequest(f"provider: {mode.provider!r} is not one of this server's ({known})")


@router.post("", status_code=201, responses=errors(403, 409))
async def create_mode(body: Mode, principal: AdminUser, db: SessionDep, state: StateDep) -> ModeOut:
    _check_provider(body, state)
    mode = await repo.create_mode(
        db, team_id=principal.team_id, mode=body, created_by=principal.member_id
    )
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="mode.create",
        target_type="mode",
        target_id=None,
        data={"name": mode.name},
    )
    return _out(mode, "team")


@router.put("/{name}", responses=errors(403, 404))
async def replace_mode(
    name: str, body: Mode, principal: AdminUser, db: SessionDep, state: StateDep
) -> ModeOut:
    if body.name != name:
        raise BadRequest("the body's name must match the path")
    _check_provider(body, state)
    mode = await repo.replace_mode(db, team_id=principal.team_id, mode=body)
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="mode.replace",
        target_type="mode",
        target_id=None,
        data={"name": name},
    )
    return _out(mode, "team")


@router.delete("/{name}", status_code=204, responses=errors(403, 404, 409))
async def delete_mode(name: str, principal: AdminUser, db: SessionDep) -> Response:
    await repo.delete_mode(db, team_id=principal.team_id, name=name)
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="mode.delete",
        target_type="mode",
        target_id=None,
        data={"name": name},
    )
    return Response(status_code=204)
