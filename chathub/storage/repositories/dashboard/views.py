"""What the dashboard repository returns: frozen views of one version."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class TaskView:
    """A task as of one version. ``created_at`` is when version 1 was written,
    ``updated_at`` when this version was."""

    id: str
    version: int
    title: str
    owner: str | None
    due: str | None
    status: str
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class InsightView:
    """An insight as of one version (timestamps as for :class:`TaskView`)."""

    id: str
    version: int
    text: str
    kind: str
    session_id: str | None
    source_message_id: str | None
    author_kind: str
    author_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StateView:
    """A state key's value as of one version."""

    key: str
    value: Any
    version: int
    updated_by: str | None
    author_kind: str
    session_id: str | None
    source_message_id: str | None
    updated_at: datetime


@dataclass(frozen=True)
class TaskCounts:
    open: int
    done: int
    dropped: int


@dataclass(frozen=True)
class OwnerLoad:
    owner: str | None
    open: int


@dataclass(frozen=True)
class Counts:
    tasks: TaskCounts
    insights: int
    states: int


@dataclass(frozen=True)
class SummaryView:
    version: int
    text: str
    created_at: datetime


@dataclass(frozen=True)
class DashboardView:
    """What ``GET /dashboard`` shows, in the shape of its JSON body
    (:meth:`as_dict`). ``version`` was read before the rest, so the content
    is at least as new as the version it carries."""

    version: int
    counts: Counts
    open_tasks: list[TaskView]
    open_tasks_by_owner: list[OwnerLoad]
    recent_insights: list[InsightView]
    states: list[StateView]
    summary: SummaryView | None

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and datetimes (for orjson), as REST sends it."""
        return asdict(self)
