"""``/dashboard``: the team's tasks, insights, states and summary.

Tasks, insights and states are versioned: every change appends a version
and history is never rewritten (see ``storage/repositories/dashboard/``).

Beyond PROTOCOL.md (additions, nothing changed):

- ``POST /dashboard/tasks`` (member+) creates a task by hand.
- ``GET /dashboard/tasks/{id}/history``, ``GET /dashboard/insights/{id}`` and
  ``.../history``, ``GET /dashboard/states/{key}``: every version oldest
  first, paginated like every list.
- ``PUT /dashboard/states/{key}`` (member+) sets a state by hand; ``If-Match``
  is optional there (``0``: only if the key does not exist yet).
- Single objects carry ``ETag: "<version>"``. ``If-Match`` takes the version
  bare (``3``) or as that ETag (``"3"``). On ``PATCH /dashboard/tasks/{id}`` it
  is required: missing or not a version number is ``400 bad_request``; stale is
  ``409 conflict`` with ``current_version`` in the problem body.
- A write that changes nothing appends no version, answers the current one
  and pushes no ``dashboard.updated``.
- ``GET /dashboard/tasks`` filters by ``assignee`` (the task's ``owner``;
  ``owner`` is accepted as a synonym) and lists newest task first.
- ``GET /dashboard`` ``version`` is the team's count of version rows: it
  rises with every change and never falls; the same number the dashboard
  channel of the socket carries.

Every write here that changes something publishes ``dashboard.updated`` to
the team's subscribed sockets (on every instance) once it has committed, in
the order the writes committed (see ``server/dashboards.py``).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query
from pydantic import AfterValidator, BaseModel, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from chathub.errors import BadRequest, NotFound
from chathub.handlers.deps import MemberUser, PageDep, SessionDep, StateDep, Viewer
from chathub.handlers.schemas import Out, Page, StrictBody, errors
from chathub.server.state import AppState
from chathub.storage.repositories import dashboard as repo
from chathub.storage.repositories import sessions

router = APIRouter(prefix="/dashboard", tags=["dashboard"])

TaskStatus = Literal["open", "done", "dropped"]


def _real_date(value: str) -> str:
    try:
        date.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("not a real calendar date") from exc
    return value


Due = Annotated[str, Field(pattern=repo.DUE_PATTERN), AfterValidator(_real_date)]
StateKey = Annotated[str, Path(pattern=repo.STATE_KEY_PATTERN)]
IfMatch = Annotated[
    str | None,
    Header(description='the version the object must be at: `3` or `"3"` (its ETag)'),
]
_VERSION = re.compile(r"\d{1,9}")


def expected_version(if_match: str | None, *, required: bool) -> int | None:
    """The version an ``If-Match`` header names; BadRequest when it is
    missing but ``required``, or is not a version number."""
    if if_match is None:
        if required:
            raise BadRequest('If-Match is required: the version you changed, such as "3"')
        return None
    raw = if_match.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if not _VERSION.fullmatch(raw):
        raise BadRequest('If-Match must be a version number, such as 3 or "3"')
    return int(raw)


def etag(version: int) -> str:
    return f'"{version}"'


# --- shapes --------------------------------------------------------------


class TaskOut(Out):
    id: str
    title: str
    owner: str | None
    due: str | None
    status: str
    version: int
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


class InsightOut(Out):
    id: str
    text: str
    kind: str
    version: int
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


class StateOut(Out):
    key: str
    value: Any
    version: int
    updated_by: str | None
    author_kind: str
    session_id: str | None
    source_message_id: str | None
    updated_at: datetime


class SummaryOut(Out):
    version: int
    text: str
    created_at: datetime


class TaskCountsOut(Out):
    open: int
    done: int
    dropped: int


class CountsOut(Out):
    tasks: TaskCountsOut
    insights: int
    states: int


class OwnerLoadOut(Out):
    owner: str | None
    open: int


class DashboardOut(Out):
    """The whole dashboard; also the body of the socket's ``dashboard.snapshot``."""

    version: int
    counts: CountsOut
    open_tasks: list[TaskOut] = Field(
        description=f"open tasks, soonest due first, undated last (at most "
        f"{repo.DASHBOARD_OPEN_TASKS}; the rest via /dashboard/tasks)"
    )
    open_tasks_by_owner: list[OwnerLoadOut] = Field(
        description="open tasks per owner, most first; owner null is unassigned"
    )
    recent_insights: list[InsightOut]
    states: list[StateOut]
    summary: SummaryOut | None


class TaskCreate(StrictBody):
    title: str = Field(min_length=1, max_length=repo.MAX_TITLE)
    owner: str | None = Field(default=None, min_length=1, max_length=repo.MAX_OWNER)
    due: Due | None = None
    status: TaskStatus = "open"
    session_id: str | None = Field(default=None, max_length=36)
    source_message_id: str | None = Field(
        default=None, max_length=36, description="sets session_id to the message's session"
    )


class TaskPatch(StrictBody):
    """Only the fields sent change; ``owner`` and ``due`` may be null (cleared)."""

    title: str | None = Field(default=None, min_length=1, max_length=repo.MAX_TITLE)
    owner: str | None = Field(default=None, min_length=1, max_length=repo.MAX_OWNER)
    due: Due | None = None
    status: TaskStatus | None = None

    @model_validator(mode="after")
    def _title_and_status_are_not_null(self) -> TaskPatch:
        for name in ("title", "status"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class StateSet(StrictBody):
    value: Any = Field(description="any JSON value, null included")


# --- dashboard -----------------------------------------------------------


@router.get("", responses=errors())
async def get_dashboard(principal: Viewer, db: SessionDep) -> DashboardOut:
    """Counts, open tasks, recent insights, current states and the summary."""
    view = await repo.dashboard(db, team_id=principal.team_id)
    return DashboardOut.model_validate(view)


# --- tasks ---------------------------------------------------------------


@router.get("/tasks", responses=errors())
async def list_tasks(
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    status: TaskStatus | None = None,
    assignee: Annotated[str | None, Query(max_length=repo.MAX_OWNER)] = None,
    owner: Annotated[
        str | None, Query(max_length=repo.MAX_OWNER, description="same as assignee")
    ] = None,
    session_id: Annotated[str | None, Query(max_length=36)] = None,
) -> Page[TaskOut]:
    """Current tasks, newest first."""
    if assignee is not None and owner is not None and assignee != owner:
        raise BadRequest("assignee and owner name the same filter; give one")
    result = await repo.list_tasks(
        db,
        team_id=principal.team_id,
        limit=page.limit,
        cursor=page.cursor,
        status=status,
        owner=assignee if assignee is not None else owner,
        session_id=session_id,
    )
    return Page(
        items=[TaskOut.model_validate(t) for t in result.items], next_cursor=result.next_cursor
    )


async def _provenance(
    db: AsyncSession, *, team_id: str, session_id: str | None, message_id: str | None
) -> str | None:
    """The session a hand-made task belongs to, checked to be the team's."""
    if message_id is not None:
        try:
            message = await sessions.get_message(db, team_id=team_id, message_id=message_id)
        except NotFound as exc:
            raise BadRequest("source_message_id: no such message") from exc
        if session_id is not None and session_id != message.session_id:
            raise BadRequest("source_message_id is not a message of session_id")
        return message.session_id
    if session_id is not None:
        try:
            await sessions.get_session(db, team_id=team_id, session_id=session_id)
        except NotFound as exc:
            raise BadRequest("session_id: no such session") from exc
    return session_id


async def _announce(
    state: AppState, db: AsyncSession, team_id: str, kind: str, item: BaseModel
) -> None:
    """Push ``dashboard.updated`` to subscribers, from inside the write's
    transaction. Only after a write: the write took the team's dashboard
    lock, so the version counted here is this change's own, and updates go
    out in version order (see ``chathub.server.dashboards``)."""
    version = await repo.dashboard_version(db, team_id=team_id)
    await state.dashboards.publish(team_id, version, {kind: [item.model_dump(mode="json")]})


@router.post("/tasks", status_code=201, responses=errors(403))
async def create_task(
    body: TaskCreate,
    principal: MemberUser,
    db: SessionDep,
    response: Response,
    state: StateDep,
) -> TaskOut:
    """Create a task by hand (version 1)."""
    session_id = await _provenance(
        db,
        team_id=principal.team_id,
        session_id=body.session_id,
        message_id=body.source_message_id,
    )
    view = await repo.create_task(
        db,
        team_id=principal.team_id,
        title=body.title,
        owner=body.owner,
        due=body.due,
        status=body.status,
        session_id=session_id,
        source_message_id=body.source_message_id,
        author_kind="user",
        author_id=principal.member_id,
    )
    response.headers["ETag"] = etag(view.version)
    response.headers["Location"] = f"{router.prefix}/tasks/{view.id}"
    out = TaskOut.model_validate(view)
    await _announce(state, db, principal.team_id, "tasks", out)
    return out


@router.get("/tasks/{task_id}", responses=errors(404))
async def get_task(task_id: str, principal: Viewer, db: SessionDep, response: Response) -> TaskOut:
    """The task's current version; ``ETag`` is that version."""
    view = await repo.get_task(db, team_id=principal.team_id, task_id=task_id)
    response.headers["ETag"] = etag(view.version)
    return TaskOut.model_validate(view)


@router.patch("/tasks/{task_id}", responses=errors(403, 404, 409))
async def patch_task(
    task_id: str,
    body: TaskPatch,
    principal: MemberUser,
    db: SessionDep,
    response: Response,
    state: StateDep,
    if_match: IfMatch = None,
) -> TaskOut:
    """Append a version with the fields sent, if the task is still at the
    ``If-Match`` version (else ``409``)."""
    expected = expected_version(if_match, required=True)
    view = await repo.update_task(
        db,
        team_id=principal.team_id,
        task_id=task_id,
        expected_version=expected,
        author_kind="user",
        author_id=principal.member_id,
        **body.model_dump(exclude_unset=True),
    )
    response.headers["ETag"] = etag(view.version)
    out = TaskOut.model_validate(view)
    if view.version != expected:  # else nothing changed
        await _announce(state, db, principal.team_id, "tasks", out)
    return out


@router.get("/tasks/{task_id}/history", responses=errors(404))
async def task_history(
    task_id: str, principal: Viewer, db: SessionDep, page: PageDep
) -> Page[TaskOut]:
    """Every version of the task, oldest first; ``updated_at`` is when each was written."""
    result = await repo.task_history(
        db, team_id=principal.team_id, task_id=task_id, limit=page.limit, cursor=page.cursor
    )
    return Page(
        items=[TaskOut.model_validate(t) for t in result.items], next_cursor=result.next_cursor
    )


# --- insights ------------------------------------------------------------


@router.get("/insights", responses=errors())
async def list_insights(
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    kind: Annotated[str | None, Query(pattern=repo.INSIGHT_KIND_PATTERN)] = None,
    session_id: Annotated[str | None, Query(max_length=36)] = None,
) -> Page[InsightOut]:
    """Current insights, newest first."""
    result = await repo.list_insights(
        db,
        team_id=principal.team_id,
        limit=page.limit,
        cursor=page.cursor,
        kind=kind,
        session_id=session_id,
    )
    return Page(
        items=[InsightOut.model_validate(i) for i in result.items],
        next_cursor=result.next_cursor,
    )


@router.get("/insights/{insight_id}", responses=errors(404))
async def get_insight(
    insight_id: str, principal: Viewer, db: SessionDep, response: Response
) -> InsightOut:
    view = await repo.get_insight(db, team_id=principal.team_id, insight_id=insight_id)
    response.headers["ETag"] = etag(view.version)
    return InsightOut.model_validate(view)


@router.get("/insights/{insight_id}/history", responses=errors(404))
async def insight_history(
    insight_id: str, principal: Viewer, db: SessionDep, page: PageDep
) -> Page[InsightOut]:
    """Every version of the insight, oldest first."""
    result = await repo.insight_history(
        db, team_id=principal.team_id, insight_id=insight_id, limit=page.limit, cursor=page.cursor
    )
    return Page(
        items=[InsightOut.model_validate(i) for i in result.items],
        next_cursor=result.next_cursor,
    )


# --- states --------------------------------------------------------------


@router.get("/states", responses=errors())
async def list_states(principal: Viewer, db: SessionDep, page: PageDep) -> Page[StateOut]:
    """The current value of each state key, by key."""
    result = await repo.current_states(
        db, team_id=principal.team_id, limit=page.limit, cursor=page.cursor
    )
    return Page(
        items=[StateOut.model_validate(s) for s in result.items], next_cursor=result.next_cursor
    )


@router.get("/states/{key}", responses=errors(404))
async def get_state(
    key: StateKey, principal: Viewer, db: SessionDep, response: Response
) -> StateOut:
    view = await repo.get_state(db, team_id=principal.team_id, key=key)
    response.headers["ETag"] = etag(view.version)
    return StateOut.model_validate(view)


@router.put("/states/{key}", responses=errors(403, 409))
async def set_state(
    key: StateKey,
    body: StateSet,
    principal: MemberUser,
    db: SessionDep,
    response: Response,
    state: StateDep,
    if_match: IfMatch = None,
) -> StateOut:
    """Set the key's value by hand: appends a version unless the value is
    already the current one. With ``If-Match``, only from that version."""
    expected = expected_version(if_match, required=False)
    view, written = await repo.set_state(
        db,
        team_id=principal.team_id,
        key=key,
        value=body.value,
        author_kind="user",
        updated_by=principal.member_id,
        expected_version=expected,
    )
    response.headers["ETag"] = etag(view.version)
    out = StateOut.model_validate(view)
    if written:
        await _announce(state, db, principal.team_id, "states", out)
    return out


@router.get("/states/{key}/history", responses=errors(404))
async def state_history(
    key: StateKey, principal: Viewer, db: SessionDep, page: PageDep
) -> Page[StateOut]:
    """Every version of the key, oldest first; versions are never rewritten."""
    result = await repo.state_history(
        db, team_id=principal.team_id, key=key, limit=page.limit, cursor=page.cursor
    )
    return Page(
        items=[StateOut.model_validate(s) for s in result.items], next_cursor=result.next_cursor
    )
