"""Summaries, the dashboard version and the dashboard itself."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from chathub.errors import Conflict
from chathub.storage.models import DashboardSummary, InsightVersion, StateVersion, TaskVersion
from chathub.storage.repositories.dashboard._validation import MAX_SUMMARY_TEXT, _check_text
from chathub.storage.repositories.dashboard._versions import MAX_ATTEMPTS, _insert_version
from chathub.storage.repositories.dashboard.insights import _current_insights, _insight_views
from chathub.storage.repositories.dashboard.states import _current_states_stmt, _state_view
from chathub.storage.repositories.dashboard.tasks import _current_tasks, _task_views
from chathub.storage.repositories.dashboard.views import (
    Counts,
    DashboardView,
    OwnerLoad,
    SummaryView,
    TaskCounts,
)

# On the dashboard itself; the full lists are paginated elsewhere.
DASHBOARD_OPEN_TASKS = 50
DASHBOARD_RECENT_INSIGHTS = 10
DASHBOARD_STATES = 100


def _summary_view(row: DashboardSummary) -> SummaryView:
    return SummaryView(version=row.version, text=row.text, created_at=row.created_at)


async def _latest_summary_row(db: AsyncSession, *, team_id: str) -> DashboardSummary | None:
    return await db.scalar(
        select(DashboardSummary)
        .where(DashboardSummary.team_id == team_id)
        .order_by(DashboardSummary.version.desc())
        .limit(1)
    )


async def latest_summary(db: AsyncSession, *, team_id: str) -> SummaryView | None:
    row = await _latest_summary_row(db, team_id=team_id)
    return _summary_view(row) if row is not None else None


async def add_summary(db: AsyncSession, *, team_id: str, text: str) -> SummaryView:
    """Append the next summary version; the same text as the latest writes nothing."""
    checked = _check_text("summary", text, max_length=MAX_SUMMARY_TEXT)
    for _ in range(MAX_ATTEMPTS):
        latest = await _latest_summary_row(db, team_id=team_id)
        if latest is not None and latest.text == checked:
            return _summary_view(latest)
        values = {
            "team_id": team_id,
            "version": (latest.version if latest is not None else 0) + 1,
            "text": checked,
        }
        row = await _insert_version(db, DashboardSummary, values, ("team_id", "version"))
        if row is not None:
            return _summary_view(row)
    raise Conflict("summary is changing too fast; try again")


# --- the dashboard -------------------------------------------------------


async def dashboard_version(db: AsyncSession, *, team_id: str) -> int:
    """The team's dashboard version: how many version rows it has. It rises
    with every change and never falls (see the package docstring)."""
    counts = [
        select(func.count()).select_from(model).where(model.team_id == team_id).scalar_subquery()
        for model in (TaskVersion, InsightVersion, StateVersion, DashboardSummary)
    ]
    total = await db.scalar(select(counts[0] + counts[1] + counts[2] + counts[3]))
    return int(total or 0)


async def dashboard(db: AsyncSession, *, team_id: str) -> DashboardView:
    """The team's dashboard: counts, open tasks (soonest due first, undated
    last), open tasks per owner, recent insights, current states, summary."""
    version = await dashboard_version(db, team_id=team_id)

    current = _current_tasks(team_id)
    statuses = await db.execute(
        current.with_only_columns(TaskVersion.status, func.count()).group_by(TaskVersion.status)
    )
    by_status = {status: n for status, n in statuses}
    open_rows = await db.scalars(
        current.where(TaskVersion.status == "open")
        .order_by(TaskVersion.due.is_(None), TaskVersion.due, TaskVersion.task_id)
        .limit(DASHBOARD_OPEN_TASKS)
    )
    loads = (
        await db.execute(
            current.where(TaskVersion.status == "open")
            .with_only_columns(TaskVersion.owner, func.count())
            .group_by(TaskVersion.owner)
        )
    ).all()
    by_owner = sorted(
        (OwnerLoad(owner=owner, open=n) for owner, n in loads),
        key=lambda load: (-load.open, load.owner is None, load.owner or ""),
    )

    insights = _current_insights(team_id)
    insight_count = await db.scalar(insights.with_only_columns(func.count()))
    recent = await db.scalars(
        insights.order_by(InsightVersion.insight_id.desc()).limit(DASHBOARD_RECENT_INSIGHTS)
    )

    states = _current_states_stmt(team_id)
    state_count = await db.scalar(states.with_only_columns(func.count()))
    state_rows = await db.scalars(states.order_by(StateVersion.key).limit(DASHBOARD_STATES))

    return DashboardView(
        version=version,
        counts=Counts(
            tasks=TaskCounts(
                open=by_status.get("open", 0),
                done=by_status.get("done", 0),
                dropped=by_status.get("dropped", 0),
            ),
            insights=int(insight_count or 0),
            states=int(state_count or 0),
        ),
        open_tasks=await _task_views(db, open_rows),
        open_tasks_by_owner=by_owner,
        recent_insights=await _insight_views(db, recent),
        states=[_state_view(r) for r in state_rows],
        summary=await latest_summary(db, team_id=team_id),
    )
