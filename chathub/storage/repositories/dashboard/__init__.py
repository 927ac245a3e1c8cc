"""The team dashboard: versioned tasks, insights and states, and summaries.

Immutable versions
    Every change to a task, insight or state key is a new row whose ``version``
    is the previous one plus one; version 1 is the creation. This package only
    ever INSERTs into the version tables, never UPDATEs or DELETEs them. The
    current view of a task (insight, state key) is its highest version.

Concurrent writers
    Two writers that start from the same version race for the same unique
    ``(id, version)`` key. The row is written with ``INSERT ... ON CONFLICT DO
    NOTHING``, so the loser writes nothing and the caller's transaction stays
    usable (no failed flush to roll back). The loser then re-reads: with an
    ``expected_version`` it gets :class:`PreconditionFailed` (409, with the
    ``current_version``); without one, its change is re-applied on top of the
    winner's (at most :data:`MAX_ATTEMPTS` times, then :class:`Conflict`).

No-op writes
    A change that leaves every field as it is writes no version and returns
    the current view, so re-extracting the same facts does not grow history.
    ``expected_version`` is still checked first.

Dashboard version
    :func:`dashboard_version` is the number of version rows the team has
    (task, insight and state versions plus summaries). Rows are never deleted
    and every change inserts exactly one, so it rises whenever something on
    the dashboard changes, never falls, and is the same on every replica.
    Every version row, a creation's included, is written through
    ``_versions``, which first takes the team's dashboard lock: writers of
    one team are serialised from their first write to their commit, so two
    changes made at the same moment announce two different versions, rising
    in the order they commit. Count after writing, in the same transaction;
    a write that changed nothing took no lock, and has nothing to announce.

Validation
    Field values are checked here (status, due date, sizes, state keys, author
    kinds) so that every writer, REST or extraction, stores the same shapes;
    a bad value is :class:`BadRequest` and writes nothing. References
    (``session_id``, ``source_message_id``) are the caller's to check.

Every function is scoped by ``team_id``: an id of another team is NotFound.
Functions flush, never commit.

Layout
    ``views`` (what is returned), ``tasks``, ``insights``, ``states``,
    ``summary`` (summaries, the dashboard version and the dashboard), over
    ``_validation`` (field checks) and ``_versions`` (writing one version row).
    Import the names from this package, not from its modules.
"""

from __future__ import annotations

from chathub.storage.repositories.dashboard._validation import (
    AUTHOR_KINDS,
    DUE_PATTERN,
    INSIGHT_FIELDS,
    INSIGHT_KIND_PATTERN,
    MAX_INSIGHT_TEXT,
    MAX_OWNER,
    MAX_SUMMARY_TEXT,
    MAX_TITLE,
    STATE_KEY_PATTERN,
    TASK_FIELDS,
    TASK_STATUSES,
    check_due,
    check_state_key,
)
from chathub.storage.repositories.dashboard._versions import MAX_ATTEMPTS, VersionRow
from chathub.storage.repositories.dashboard.insights import (
    create_insight,
    get_insight,
    insight_history,
    list_insights,
    update_insight,
)
from chathub.storage.repositories.dashboard.states import (
    current_states,
    get_state,
    set_state,
    state_history,
)
from chathub.storage.repositories.dashboard.summary import (
    DASHBOARD_OPEN_TASKS,
    DASHBOARD_RECENT_INSIGHTS,
    DASHBOARD_STATES,
    add_summary,
    dashboard,
    dashboard_version,
    latest_summary,
)
from chathub.storage.repositories.dashboard.tasks import (
    create_task,
    get_task,
    list_tasks,
    task_history,
    update_task,
)
from chathub.storage.repositories.dashboard.views import (
    Counts,
    DashboardView,
    InsightView,
    OwnerLoad,
    StateView,
    SummaryView,
    TaskCounts,
    TaskView,
)

__all__ = [
    "AUTHOR_KINDS",
    "DASHBOARD_OPEN_TASKS",
    "DASHBOARD_RECENT_INSIGHTS",
    "DASHBOARD_STATES",
    "DUE_PATTERN",
    "INSIGHT_FIELDS",
    "INSIGHT_KIND_PATTERN",
    "MAX_ATTEMPTS",
    "MAX_INSIGHT_TEXT",
    "MAX_OWNER",
    "MAX_SUMMARY_TEXT",
    "MAX_TITLE",
    "STATE_KEY_PATTERN",
    "TASK_FIELDS",
    "TASK_STATUSES",
    "Counts",
    "DashboardView",
    "InsightView",
    "OwnerLoad",
    "StateView",
    "SummaryView",
    "TaskCounts",
    "TaskView",
    "VersionRow",
    "add_summary",
    "check_due",
    "check_state_key",
    "create_insight",
    "create_task",
    "current_states",
    "dashboard",
    "dashboard_version",
    "get_insight",
    "get_state",
    "get_task",
    "insight_history",
    "latest_summary",
    "list_insights",
    "list_tasks",
    "set_state",
    "state_history",
    "task_history",
    "update_insight",
    "update_task",
]
