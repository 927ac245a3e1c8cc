"""The dashboard repository, called directly the way extraction will call it,
on the running server's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.errors import BadRequest, Conflict, NotFound, PreconditionFailed
from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as repo
from tests.harness import RunningServer, TeamFixture

Maker = async_sessionmaker[AsyncSession]


@pytest.fixture
def sm(clean_server: RunningServer) -> Maker:
    return clean_server.state.sessionmaker


async def new_task(sm: Maker, team_id: str, title: str = "Ship it", **fields: Any) -> repo.TaskView:
    async with transaction(sm) as db:
        return await repo.create_task(
            db, team_id=team_id, title=title, author_kind="extractor", **fields
        )


async def update(
    sm: Maker, team_id: str, task_id: str, expected: int | None, **changes: Any
) -> repo.TaskView:
    async with transaction(sm) as db:
        return await repo.update_task(
            db,
            team_id=team_id,
            task_id=task_id,
            expected_version=expected,
            author_kind="user",
            author_id="m1",
            **changes,
        )


async def history(sm: Maker, team_id: str, task_id: str) -> list[repo.TaskView]:
    async with transaction(sm) as db:
        return (
            await repo.task_history(db, team_id=team_id, task_id=task_id, limit=100, cursor=None)
        ).items


async def version(sm: Maker, team_id: str) -> int:
    async with transaction(sm) as db:
        return await repo.dashboard_version(db, team_id=team_id)


async def test_update_appends_a_version_and_keeps_history(sm: Maker, team: TeamFixture) -> None:
    t = await new_task(sm, team.team_id, owner="ana", session_id="s1", source_message_id="m0")
    assert (t.version, t.status, t.owner, t.author_kind) == (1, "open", "ana", "extractor")
    assert t.created_at == t.updated_at

    v2 = await update(sm, team.team_id, t.id, 1, status="done")
    assert (v2.id, v2.version, v2.status, v2.title, v2.owner) == (t.id, 2, "done", "Ship it", "ana")
    assert (v2.session_id, v2.source_message_id) == ("s1", "m0")  # carried over
    assert v2.author_kind == "user" and v2.author_id == "m1"
    assert v2.created_at == t.created_at and v2.updated_at >= t.updated_at
    before = await history(sm, team.team_id, t.id)

    v3 = await update(sm, team.team_id, t.id, None, owner=None, due="2030-01-31")
    assert (v3.version, v3.owner, v3.due, v3.status) == (3, None, "2030-01-31", "done")
    after = await history(sm, team.team_id, t.id)
    assert [h.version for h in after] == [1, 2, 3]
    assert after[:2] == before  # earlier versions are never rewritten
    assert after[0].status == "open" and after[0].owner == "ana"

    async with transaction(sm) as db:
        assert await repo.get_task(db, team_id=team.team_id, task_id=t.id) == v3


async def test_stale_expected_version_writes_nothing(sm: Maker, team: TeamFixture) -> None:
    t = await new_task(sm, team.team_id)
    await update(sm, team.team_id, t.id, 1, title="Ship it now")
    with pytest.raises(PreconditionFailed) as caught:
        await update(sm, team.team_id, t.id, 1, title="Lost")
    assert caught.value.status == 409 and caught.value.extra == {"current_version": 2}
    assert [h.title for h in await history(sm, team.team_id, t.id)] == ["Ship it", "Ship it now"]


async def test_noop_update_writes_no_version(sm: Maker, team: TeamFixture) -> None:
    t = await new_task(sm, team.team_id, owner="ana")
    before = await version(sm, team.team_id)
    same = await update(sm, team.team_id, t.id, 1, owner="ana", status="open")
    assert same.version == 1
    assert await version(sm, team.team_id) == before
    with pytest.raises(PreconditionFailed):  # the precondition still holds a no-op
        await update(sm, team.team_id, t.id, 7, owner="ana")


@pytest.mark.parametrize("expected", [1, None])
async def test_concurrent_writers_from_the_same_version(
    sm: Maker, team: TeamFixture, expected: int | None
) -> None:
    """Two transactions change version 1 at once. With an expected version one
    of them fails; without, both land, one on top of the other. (SQLite
    takes the write lock at BEGIN, so there the two run one after the other
    and cannot both read version 1; the outcome must be the same.)"""
    t = await new_task(sm, team.team_id)
    serialised = sm.kw["bind"].dialect.name == "sqlite"
    both_read = asyncio.Barrier(1 if serialised else 2)

    async def write(title: str) -> repo.TaskView | Exception:
        try:
            async with transaction(sm) as db:
                await repo.get_task(db, team_id=team.team_id, task_id=t.id)
                await both_read.wait()
                return await repo.update_task(
                    db,
                    team_id=team.team_id,
                    task_id=t.id,
                    expected_version=expected,
                    author_kind="extractor",
                    author_id=None,
                    title=title,
                )
        except PreconditionFailed as exc:
            return exc

    results = await asyncio.wait_for(asyncio.gather(write("A"), write("B")), 30)
    views = [r for r in results if isinstance(r, repo.TaskView)]
    titles = [h.title for h in await history(sm, team.team_id, t.id)]
    if expected is None:
        assert sorted(v.version for v in views) == [2, 3]
        assert titles[0] == "Ship it" and sorted(titles[1:]) == ["A", "B"]
    else:
        assert len(views) == 1 and views[0].version == 2
        assert sum(isinstance(r, PreconditionFailed) for r in results) == 1
        assert titles == ["Ship it", views[0].title]


async def test_rolled_back_transaction_leaves_nothing(sm: Maker, team: TeamFixture) -> None:
    t = await new_task(sm, team.team_id)
    with pytest.raises(RuntimeError):
        async with transaction(sm) as db:
            await repo.update_task(
                db,
                team_id=team.team_id,
                task_id=t.id,
                expected_version=1,
                author_kind="user",
                author_id=None,
                status="done",
            )
            await repo.set_state(
                db, team_id=team.team_id, key="phase", value=1, author_kind="user", updated_by=None
            )
            raise RuntimeError("caller fails after writing")
    assert [h.version for h in await history(sm, team.team_id, t.id)] == [1]
    async with transaction(sm) as db:
        states = await repo.current_states(db, team_id=team.team_id, limit=10, cursor=None)
    assert states.items == []


async def test_other_teams_rows_are_invisible(
    sm: Maker, team: TeamFixture, other_team: TeamFixture
) -> None:
    mine = await new_task(sm, team.team_id, title="mine")
    theirs = await new_task(sm, other_team.team_id, title="theirs")
    async with transaction(sm) as db:
        await repo.create_insight(db, team_id=other_team.team_id, text="x", author_kind="model")
        await repo.set_state(
            db, team_id=other_team.team_id, key="k", value=1, author_kind="model", updated_by=None
        )
    async with transaction(sm) as db:
        with pytest.raises(NotFound):
            await repo.get_task(db, team_id=team.team_id, task_id=theirs.id)
        with pytest.raises(NotFound):
            await repo.update_task(
                db,
                team_id=team.team_id,
                task_id=theirs.id,
                expected_version=None,
                author_kind="user",
                author_id=None,
                title="stolen",
            )
        with pytest.raises(NotFound):
            await repo.state_history(db, team_id=team.team_id, key="k", limit=10, cursor=None)
        listed = await repo.list_tasks(db, team_id=team.team_id, limit=100, cursor=None)
        assert [t.id for t in listed.items] == [mine.id]
        board = await repo.dashboard(db, team_id=team.team_id)
    assert board.counts.tasks.open == 1 and board.counts.insights == 0 and board.states == []
    assert (await history(sm, other_team.team_id, theirs.id))[-1].title == "theirs"


@pytest.mark.parametrize(
    "fields",
    [
        {"due": "2030-02-30"},
        {"due": "31/01/2030"},
        {"due": "20300131"},
        {"status": "closed"},
        {"title": "   "},
        {"title": "x" * 501},
        {"priority": "high"},
    ],
)
async def test_bad_fields_are_refused_and_write_nothing(
    sm: Maker, team: TeamFixture, fields: dict[str, Any]
) -> None:
    t = await new_task(sm, team.team_id)
    with pytest.raises(BadRequest):
        await update(sm, team.team_id, t.id, 1, **fields)
    if "priority" not in fields:  # create_task's keywords are its fields
        with pytest.raises(BadRequest):
            await new_task(sm, team.team_id, **({"title": "t"} | fields))
    async with transaction(sm) as db:
        listed = await repo.list_tasks(db, team_id=team.team_id, limit=100, cursor=None)
    assert [(x.id, x.version) for x in listed.items] == [(t.id, 1)]


async def test_bad_author_kind_is_refused(sm: Maker, team: TeamFixture) -> None:
    async with transaction(sm) as db:
        with pytest.raises(BadRequest):
            await repo.create_task(db, team_id=team.team_id, title="t", author_kind="robot")
        with pytest.raises(BadRequest):
            await repo.create_insight(db, team_id=team.team_id, text="t", author_kind="robot")


async def test_insights_version_like_tasks(sm: Maker, team: TeamFixture) -> None:
    async with transaction(sm) as db:
        first = await repo.create_insight(
            db, team_id=team.team_id, text="Users want dark mode", kind="need",
            author_kind="extractor", session_id="s1",
        )  # fmt: skip
        await repo.create_insight(db, team_id=team.team_id, text="Other", author_kind="model")
    async with transaction(sm) as db:
        v2 = await repo.update_insight(
            db,
            team_id=team.team_id,
            insight_id=first.id,
            expected_version=1,
            author_kind="user",
            author_id="m1",
            text="Users want a dark theme",
        )
        with pytest.raises(PreconditionFailed):
            await repo.update_insight(
                db,
                team_id=team.team_id,
                insight_id=first.id,
                expected_version=1,
                author_kind="user",
                author_id="m1",
                kind="idea",
            )
        hist = await repo.insight_history(
            db, team_id=team.team_id, insight_id=first.id, limit=10, cursor=None
        )
        needs = await repo.list_insights(
            db, team_id=team.team_id, limit=10, cursor=None, kind="need"
        )
    assert (v2.version, v2.kind, v2.session_id, v2.created_at) == (
        2,
        "need",
        "s1",
        first.created_at,
    )
    assert [(h.version, h.text) for h in hist.items] == [
        (1, "Users want dark mode"),
        (2, "Users want a dark theme"),
    ]
    assert [i.text for i in needs.items] == ["Users want a dark theme"]


async def test_states_append_versions(sm: Maker, team: TeamFixture) -> None:
    values: list[Any] = [{"phase": "design", "n": [1, 2]}, 1, True, None, "done", "done"]
    async with transaction(sm) as db:
        for value in values:
            await repo.set_state(
                db,
                team_id=team.team_id,
                key="project.phase",
                value=value,
                author_kind="extractor",
                updated_by="extractor",
            )
        hist = await repo.state_history(
            db, team_id=team.team_id, key="project.phase", limit=100, cursor=None
        )
        current = await repo.get_state(db, team_id=team.team_id, key="project.phase")
    # 1 and True are different JSON values; setting "done" twice writes once.
    assert [(h.version, h.value) for h in hist.items] == list(enumerate(values[:5], start=1))
    assert [type(h.value) for h in hist.items[1:3]] == [int, bool]
    assert (current.version, current.value, current.updated_by) == (5, "done", "extractor")


async def test_state_expected_version(sm: Maker, team: TeamFixture) -> None:
    async def put(value: Any, expected: int | None) -> repo.StateView:
        async with transaction(sm) as db:
            view, _ = await repo.set_state(
                db,
                team_id=team.team_id,
                key="budget",
                value=value,
                author_kind="user",
                updated_by="m1",
                expected_version=expected,
            )
            return view

    assert (await put(100, 0)).version == 1  # 0: only if the key is new
    with pytest.raises(PreconditionFailed):
        await put(200, 0)
    assert (await put(200, 1)).version == 2
    with pytest.raises(PreconditionFailed):
        await put(300, 1)
    with pytest.raises(BadRequest):
        async with transaction(sm) as db:
            await repo.set_state(
                db,
                team_id=team.team_id,
                key="bad key!",
                value=1,
                author_kind="user",
                updated_by=None,
            )


async def test_history_and_lists_paginate_without_gaps(sm: Maker, team: TeamFixture) -> None:
    t = await new_task(sm, team.team_id)
    for i in range(6):
        await update(sm, team.team_id, t.id, None, title=f"v{i + 2}")
    seen: list[int] = []
    cursor = None
    async with transaction(sm) as db:
        while True:
            page = await repo.task_history(
                db, team_id=team.team_id, task_id=t.id, limit=3, cursor=cursor
            )
            seen += [h.version for h in page.items]
            if (cursor := page.next_cursor) is None:
                break
    assert seen == [1, 2, 3, 4, 5, 6, 7]


async def test_summaries(sm: Maker, team: TeamFixture) -> None:
    async with transaction(sm) as db:
        assert await repo.latest_summary(db, team_id=team.team_id) is None
        one = await repo.add_summary(db, team_id=team.team_id, text="Week 1: kickoff")
        same = await repo.add_summary(db, team_id=team.team_id, text="Week 1: kickoff")
        two = await repo.add_summary(db, team_id=team.team_id, text="Week 2: build")
        latest = await repo.latest_summary(db, team_id=team.team_id)
    assert (one.version, same.version, two.version) == (1, 1, 2)
    assert latest == two


async def test_dashboard_view_and_version(sm: Maker, team: TeamFixture) -> None:
    v0 = await version(sm, team.team_id)
    assert v0 == 0
    later = await new_task(sm, team.team_id, title="later", owner="bo", due="2030-05-01")
    undated = await new_task(sm, team.team_id, title="undated", owner="ana")
    soon = await new_task(sm, team.team_id, title="soon", owner="ana", due="2030-01-02")
    await new_task(sm, team.team_id, title="nobody's")
    done = await new_task(sm, team.team_id, title="done")
    await update(sm, team.team_id, done.id, 1, status="done")
    dropped = await new_task(sm, team.team_id, title="dropped")
    await update(sm, team.team_id, dropped.id, 1, status="dropped")
    async with transaction(sm) as db:
        for i in range(12):
            await repo.create_insight(db, team_id=team.team_id, text=f"i{i}", author_kind="model")
        await repo.set_state(db, team_id=team.team_id, key="b", value=2, author_kind="model",
                             updated_by=None)  # fmt: skip
        await repo.set_state(db, team_id=team.team_id, key="a", value=1, author_kind="model",
                             updated_by=None)  # fmt: skip
        await repo.set_state(db, team_id=team.team_id, key="a", value=3, author_kind="model",
                             updated_by=None)  # fmt: skip
        await repo.add_summary(db, team_id=team.team_id, text="So far so good")
        board = await repo.dashboard(db, team_id=team.team_id)

    # 6 tasks + 2 updates + 12 insights + 3 state versions + 1 summary
    assert board.version == 24
    assert board.counts == repo.Counts(tasks=repo.TaskCounts(4, 1, 1), insights=12, states=2)
    assert [t.title for t in board.open_tasks] == ["soon", "later", "undated", "nobody's"]
    assert [(o.owner, o.open) for o in board.open_tasks_by_owner] == [
        ("ana", 2),
        ("bo", 1),
        (None, 1),
    ]
    assert [i.text for i in board.recent_insights] == [f"i{i}" for i in range(11, 1, -1)]
    assert [(s.key, s.value, s.version) for s in board.states] == [("a", 3, 2), ("b", 2, 1)]
    assert board.summary is not None and board.summary.text == "So far so good"
    body = board.as_dict()
    assert body["counts"]["tasks"]["open"] == 4 and body["open_tasks"][0]["id"] == soon.id
    assert {later.id, undated.id} <= {t["id"] for t in body["open_tasks"]}

    # A no-op leaves the version; any real change raises it.
    await update(sm, team.team_id, soon.id, 1, title="soon")
    assert await version(sm, team.team_id) == 24
    await update(sm, team.team_id, soon.id, 1, title="sooner")
    assert await version(sm, team.team_id) == 25


@contextmanager
def statements(server: RunningServer) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = server.state.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_never_updates_or_deletes_version_rows(
    clean_server: RunningServer, sm: Maker, team: TeamFixture
) -> None:
    with statements(clean_server) as seen:
        t = await new_task(sm, team.team_id)
        await update(sm, team.team_id, t.id, 1, status="done")
        with pytest.raises(PreconditionFailed):
            await update(sm, team.team_id, t.id, 1, status="dropped")
        async with transaction(sm) as db:
            i = await repo.create_insight(db, team_id=team.team_id, text="x", author_kind="model")
            await repo.update_insight(
                db,
                team_id=team.team_id,
                insight_id=i.id,
                expected_version=None,
                author_kind="model",
                author_id=None,
                text="y",
            )
            for value in (1, 2):
                await repo.set_state(
                    db, team_id=team.team_id, key="k", value=value, author_kind="model",
                    updated_by=None,
                )  # fmt: skip
            await repo.add_summary(db, team_id=team.team_id, text="s")
            await repo.dashboard(db, team_id=team.team_id)
    writes = [s for s in seen if re.match(r"\s*(UPDATE|DELETE)\b", s, re.IGNORECASE)]
    assert writes == []
    assert sum(bool(re.match(r"\s*INSERT\b", s, re.IGNORECASE)) for s in seen) == 7


async def test_unknown_ids_are_not_found(sm: Maker, team: TeamFixture) -> None:
    async with transaction(sm) as db:
        for call in (
            repo.get_task(db, team_id=team.team_id, task_id="nope"),
            repo.task_history(db, team_id=team.team_id, task_id="nope", limit=5, cursor=None),
            repo.get_insight(db, team_id=team.team_id, insight_id="nope"),
            repo.get_state(db, team_id=team.team_id, key="nope"),
        ):
            with pytest.raises(NotFound):
                await call


def test_conflict_is_a_409() -> None:
    assert PreconditionFailed.status == Conflict.status == 409


async def test_concurrent_changes_get_distinct_dashboard_versions(
    sm: Maker, team: TeamFixture
) -> None:
    """Each writer reads the dashboard version it announces in its own
    transaction, after its change: writers of one team at the same moment
    must still announce different versions, rising in the order they commit
    (a client skips an update whose version is not above the last it saw)."""
    start = await version(sm, team.team_id)
    committed: list[int] = []
    gate = asyncio.Event()

    async def change(i: int) -> int:
        async with transaction(sm) as db:
            await gate.wait()
            await repo.set_state(
                db,
                team_id=team.team_id,
                key=f"k{i}",
                value=i,
                author_kind="extractor",
                updated_by=None,
            )
            announced = await repo.dashboard_version(db, team_id=team.team_id)
            await asyncio.sleep(0.01)  # others write meanwhile, where they can
        committed.append(announced)
        return announced

    tasks = [asyncio.create_task(change(i)) for i in range(12)]
    await asyncio.sleep(0.05)
    gate.set()
    announced = await asyncio.gather(*tasks)
    assert sorted(announced) == list(range(start + 1, start + 13))
    assert committed == sorted(committed)
