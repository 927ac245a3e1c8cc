"""``/chat/sessions``: sessions and their message history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.responses import Response

from chathub.errors import NotImplementedYet
from chathub.handlers.deps import MemberUser, PageDep, SessionDep, Viewer
from chathub.handlers.schemas import Page, StrictBody, errors
from chathub.storage.repositories import audit
from chathub.storage.repositories import sessions as repo
from chathub.wire import MessageOut, SessionOut

router = APIRouter(prefix="/chat/sessions", tags=["sessions"])

MODE_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


class SessionCreate(StrictBody):
    title: str = Field(default="", max_length=500)
    mode: str = Field(default="chat", pattern=MODE_PATTERN)


class SessionPatch(StrictBody):
    title: str | None = Field(default=None, max_length=500)
    mode: str | None = Field(default=None, pattern=MODE_PATTERN)
    archived: bool | None = None


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


@router.post("", status_code=201, responses=errors(403))
async def create_session(body: SessionCreate, principal: MemberUser, db: SessionDep) -> SessionOut:
    row = await repo.create_session(
        db,
        team_id=principal.team_id,
        title=body.title,
        mode=body.mode,
        created_by=principal.member_id,
    )
    return SessionOut.model_validate(row)


@router.get("/{session_id}", responses=errors(404))
async def get_session(session_id: str, principal: Viewer, db: SessionDep) -> SessionOut:
    row = await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    return SessionOut.model_validate(row)


@router.patch("/{session_id}", responses=errors(403, 404))
async def patch_session(
    session_id: str, body: SessionPatch, principal: MemberUser, db: SessionDep
) -> SessionOut:
    row = await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    row = await repo.update_session(db, row, **changes)
    return SessionOut.model_validate(row)


@router.delete("/{session_id}", status_code=204, responses=errors(403, 404))
async def delete_session(session_id: str, principal: MemberUser, db: SessionDep) -> Response:
    row = await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    await repo.delete_session(db, row)
    await audit.record(
        db,
        team_id=principal.team_id,
        actor_id=principal.member_id,
        action="session.delete",
        target_type="session",
        target_id=row.id,
    )
    return Response(status_code=204)


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
    return Page(
        items=[MessageOut.model_validate(m) for m in result.items],
        next_cursor=result.next_cursor,
    )


@router.post("/{session_id}/messages", responses=errors(403, 404, 501))
async def post_message(session_id: str, principal: MemberUser, db: SessionDep) -> None:
    await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
    raise NotImplementedYet("replies without a socket are not available yet")
