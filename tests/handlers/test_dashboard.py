"""``/dashboard`` over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as repo
from chathub.storage.repositories import sessions
from tests.harness import RunningServer, TeamFixture
from tests.wsclient import WsClient


async def make_task(client: httpx.AsyncClient, team: TeamFixture, **fields: Any) -> dict[str, Any]:
    r = await client.post(
        "/dashboard/tasks", json={"title": "Write the spec"} | fields, headers=team.owner.headers
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def task_history(
    client: httpx.AsyncClient, team: TeamFixture, task_id: str
) -> list[dict[str, Any]]:
    r = await client.get(
        f"/dashboard/tasks/{task_id}/history", params={"limit": 100}, headers=team.owner.headers
    )
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def read_all(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_params = params | ({"cursor": cursor} if cursor else {})
        r = await client.get(path, params=page_params, headers=headers)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        if (cursor := r.json()["next_cursor"]) is None:
            return items


async def test_create_get_patch_and_history(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    created = await client.post(
        "/dashboard/tasks",
        json={"title": "Write the spec", "owner": "ana", "due": "2030-03-01"},
        headers=h,
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["version"] == 1 and task["status"] == "open" and task["owner"] == "ana"
    assert task["due"] == "2030-03-01" and task["author_kind"] == "user"
    assert task["author_id"] == team.owner.member_id
    assert created.headers["etag"] == '"1"'
    assert created.headers["location"] == f"/dashboard/tasks/{task['id']}"

    got = await client.get(f"/dashboard/tasks/{task['id']}", headers=h)
    assert got.json() == task and got.headers["etag"] == '"1"'

    # The ETag as given back, quoted.
    v2 = await client.patch(
        f"/dashboard/tasks/{task['id']}",
        json={"status": "done"},
        headers=h | {"If-Match": got.headers["etag"]},
    )
    assert v2.status_code == 200, v2.text
    assert v2.json()["version"] == 2 and v2.json()["status"] == "done"
    assert v2.json()["title"] == "Write the spec" and v2.json()["owner"] == "ana"
    assert v2.headers["etag"] == '"2"'

    # The bare version; null clears owner and due.
    v3 = await client.patch(
        f"/dashboard/tasks/{task['id']}",
        json={"owner": None, "due": None, "title": "Write the spec v2"},
        headers=h | {"If-Match": "2"},
    )
    assert v3.status_code == 200, v3.text
    assert (v3.json()["version"], v3.json()["owner"], v3.json()["due"]) == (3, None, None)

    history = await task_history(client, team, task["id"])
    assert [v["version"] for v in history] == [1, 2, 3]
    assert history[0] == task  # the original version, untouched
    assert history[1] == v2.json() and history[2] == v3.json()
    assert (await client.get(f"/dashboard/tasks/{task['id']}", headers=h)).json() == v3.json()


async def test_stale_if_match_is_409_and_writes_nothing(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    task = await make_task(client, team)
    ok = await client.patch(
        f"/dashboard/tasks/{task['id']}", json={"title": "A"}, headers=h | {"If-Match": "1"}
    )
    assert ok.status_code == 200
    stale = await client.patch(
        f"/dashboard/tasks/{task['id']}", json={"title": "B"}, headers=h | {"If-Match": '"1"'}
    )
    assert stale.status_code == 409
    assert stale.headers["content-type"].startswith("application/problem+json")
    assert stale.json()["code"] == "conflict" and stale.json()["current_version"] == 2
    assert [v["title"] for v in await task_history(client, team, task["id"])] == [
        "Write the spec",
        "A",
    ]


@pytest.mark.parametrize("if_match", [None, "", "abc", "1.0", "-1", 'W/"1"', "*", '"1'])
async def test_missing_or_malformed_if_match_is_400(
    client: httpx.AsyncClient, team: TeamFixture, if_match: str | None
) -> None:
    h = team.owner.headers
    task = await make_task(client, team)
    headers = h | ({"If-Match": if_match} if if_match is not None else {})
    r = await client.patch(f"/dashboard/tasks/{task['id']}", json={"title": "x"}, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad_request" and "If-Match" in r.json()["detail"]
    assert len(await task_history(client, team, task["id"])) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"due": "2030-02-30"},
        {"due": "tomorrow"},
        {"due": "2030-1-5"},
        {"due": 20300105},
        {"status": "closed"},
        {"status": None},
        {"title": None},
        {"title": "   "},
        {"title": "x" * 501},
        {"owner": 7},
        {"priority": "high"},
        {"title": "ok", "version": 9},
        [],
    ],
)
async def test_bad_patch_bodies_are_400_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, body: object
) -> None:
    task = await make_task(client, team)
    r = await client.patch(
        f"/dashboard/tasks/{task['id']}", json=body, headers=team.owner.headers | {"If-Match": "1"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad_request"
    assert await task_history(client, team, task["id"]) == [task]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": "t", "due": "2030-13-01"},
        {"title": "t", "status": "later"},
        {"title": "t", "assignee": "ana"},
        {"title": "t", "session_id": "no-such-session"},
        {"title": "t", "source_message_id": "no-such-message"},
    ],
)
async def test_bad_create_bodies_are_400_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, body: dict[str, Any]
) -> None:
    r = await client.post("/dashboard/tasks", json=body, headers=team.owner.headers)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad_request"
    listed = await client.get("/dashboard/tasks", headers=team.owner.headers)
    assert listed.json() == {"items": [], "next_cursor": None}


async def test_noop_patch_keeps_the_version(client: httpx.AsyncClient, team: TeamFixture) -> None:
    task = await make_task(client, team, owner="ana")
    r = await client.patch(
        f"/dashboard/tasks/{task['id']}",
        json={"owner": "ana", "status": "open"},
        headers=team.owner.headers | {"If-Match": "1"},
    )
    assert r.status_code == 200 and r.json() == task and r.headers["etag"] == '"1"'
    assert len(await task_history(client, team, task["id"])) == 1


@pytest.mark.parametrize("same_key", [True, False])
async def test_concurrent_patches_with_the_same_if_match(
    client: httpx.AsyncClient, team: TeamFixture, same_key: bool
) -> None:
    task = await make_task(client, team)
    first = team.owner
    second = team.owner if same_key else await team.actor("member")
    results = await asyncio.gather(
        *(
            client.patch(
                f"/dashboard/tasks/{task['id']}",
                json={"title": title},
                headers=actor.headers | {"If-Match": "1"},
            )
            for actor, title in ((first, "A"), (second, "B"))
        )
    )
    assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    winner = next(r.json() for r in results if r.status_code == 200)
    loser = next(r.json() for r in results if r.status_code == 409)
    assert winner["version"] == 2 and loser["code"] == "conflict"
    history = await task_history(client, team, task["id"])
    assert [v["title"] for v in history] == ["Write the spec", winner["title"]]


async def test_task_pagination_has_no_duplicates_or_gaps(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    made = [(await make_task(client, team, title=f"t{i}"))["id"] for i in range(23)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/dashboard/tasks", params=params, headers=h)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 5
        seen += [t["id"] for t in page["items"]]
        pages += 1
        # Tasks changing while a client pages (here: one already seen and one
        # not yet seen) neither repeat nor drop out.
        if pages == 2:
            for task_id in (seen[0], made[0]):
                r = await client.patch(
                    f"/dashboard/tasks/{task_id}",
                    json={"status": "done"},
                    headers=h | {"If-Match": "1"},
                )
                assert r.status_code == 200
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert seen == list(reversed(made))  # newest task first


async def test_task_filters(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    s1 = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    s2 = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    await make_task(client, team, title="a", owner="ana", session_id=s1)
    b = await make_task(client, team, title="b", owner="bo", session_id=s1)
    await make_task(client, team, title="c", owner="ana", session_id=s2)
    await make_task(client, team, title="d")
    r = await client.patch(
        f"/dashboard/tasks/{b['id']}", json={"status": "done"}, headers=h | {"If-Match": "1"}
    )
    assert r.status_code == 200
    cases: list[tuple[dict[str, str], set[str]]] = [
        ({}, {"a", "b", "c", "d"}),
        ({"status": "open"}, {"a", "c", "d"}),
        ({"status": "done"}, {"b"}),
        ({"status": "dropped"}, set()),
        ({"assignee": "ana"}, {"a", "c"}),
        ({"owner": "bo"}, {"b"}),
        ({"session_id": s1}, {"a", "b"}),
        ({"session_id": s2, "assignee": "ana", "status": "open"}, {"c"}),
    ]
    for params, expected in cases:
        items = await read_all(client, "/dashboard/tasks", h, limit=2, **params)
        assert {t["title"] for t in items} == expected, params


@pytest.mark.parametrize(
    "params",
    [
        {"status": "closed"},
        {"assignee": "ana", "owner": "bo"},
        {"cursor": "!!!"},
        {"limit": 0},
        {"limit": 101},
    ],
)
async def test_bad_task_queries_are_400(
    client: httpx.AsyncClient, team: TeamFixture, params: dict[str, Any]
) -> None:
    r = await client.get("/dashboard/tasks", params=params, headers=team.owner.headers)
    assert r.status_code == 400 and r.json()["code"] == "bad_request"


async def test_create_takes_the_session_of_its_source_message(
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
    clean_server: RunningServer,
) -> None:
    h = team.owner.headers
    mine = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    theirs = (
        await client.post("/chat/sessions", json={}, headers=other_team.owner.headers)
    ).json()["id"]
    async with transaction(clean_server.state.sessionmaker) as db:
        message, _ = await sessions.add_user_message(
            db,
            team_id=team.team_id,
            session_id=mine,
            content="ana will write the spec",
            client_msg_id="c1",
            author_id=None,
            mode="chat",
        )
    task = await make_task(client, team, source_message_id=message.id)
    assert task["session_id"] == mine and task["source_message_id"] == message.id
    for body in ({"session_id": theirs}, {"session_id": theirs, "source_message_id": message.id}):
        r = await client.post("/dashboard/tasks", json={"title": "x"} | body, headers=h)
        assert r.status_code == 400, r.text


async def test_viewer_reads_but_cannot_write(client: httpx.AsyncClient, team: TeamFixture) -> None:
    viewer = await team.actor("viewer")
    task = await make_task(client, team)
    v = viewer.headers
    assert (await client.get(f"/dashboard/tasks/{task['id']}", headers=v)).status_code == 200
    assert (await client.get("/dashboard", headers=v)).status_code == 200
    for call in (
        client.post("/dashboard/tasks", json={"title": "x"}, headers=v),
        client.patch(
            f"/dashboard/tasks/{task['id']}", json={"title": "x"}, headers=v | {"If-Match": "1"}
        ),
        client.put("/dashboard/states/phase", json={"value": 1}, headers=v),
    ):
        r = await call
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert await task_history(client, team, task["id"]) == [task]
    r = await client.get("/dashboard/states", headers=team.owner.headers)
    assert r.json()["items"] == []
    member = await team.actor("member")
    r = await client.patch(
        f"/dashboard/tasks/{task['id']}",
        json={"title": "x"},
        headers=member.headers | {"If-Match": "1"},
    )
    assert r.status_code == 200 and r.json()["author_id"] == member.member_id


async def test_unauthenticated_is_401(client: httpx.AsyncClient) -> None:
    for path in ("/dashboard", "/dashboard/tasks", "/dashboard/states"):
        r = await client.get(path)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"


async def test_another_teams_rows_are_404_and_never_listed(
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
    clean_server: RunningServer,
) -> None:
    theirs = await make_task(client, other_team, title="secret")
    o = other_team.owner.headers
    assert (
        await client.put("/dashboard/states/secret", json={"value": 1}, headers=o)
    ).status_code == 200
    async with transaction(clean_server.state.sessionmaker) as db:
        insight = await repo.create_insight(
            db, team_id=other_team.team_id, text="secret", author_kind="model"
        )
    mine = await make_task(client, team, title="mine")
    h = team.owner.headers
    for path in (
        f"/dashboard/tasks/{theirs['id']}",
        f"/dashboard/tasks/{theirs['id']}/history",
        f"/dashboard/insights/{insight.id}",
        f"/dashboard/insights/{insight.id}/history",
        "/dashboard/states/secret",
        "/dashboard/states/secret/history",
    ):
        r = await client.get(path, headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found", path
    r = await client.patch(
        f"/dashboard/tasks/{theirs['id']}", json={"title": "x"}, headers=h | {"If-Match": "1"}
    )
    assert r.status_code == 404
    assert [t["id"] for t in await read_all(client, "/dashboard/tasks", h)] == [mine["id"]]
    assert await read_all(client, "/dashboard/insights", h) == []
    assert await read_all(client, "/dashboard/states", h) == []
    board = (await client.get("/dashboard", headers=h)).json()
    assert board["counts"] == {"tasks": {"open": 1, "done": 0, "dropped": 0}, "insights": 0,
                               "states": 0}  # fmt: skip
    assert [t["title"] for t in board["open_tasks"]] == ["mine"] and board["states"] == []
    # Writing to our own key of the same name leaves theirs alone.
    await client.put("/dashboard/states/secret", json={"value": 2}, headers=h)
    theirs_now = (await client.get("/dashboard/states/secret", headers=o)).json()
    assert (theirs_now["value"], theirs_now["version"]) == (1, 1)
    assert (await client.get(f"/dashboard/tasks/{theirs['id']}", headers=o)).json() == theirs


async def seed_insights(server: RunningServer, team_id: str) -> list[repo.InsightView]:
    made = []
    async with transaction(server.state.sessionmaker) as db:
        for i in range(7):
            made.append(
                await repo.create_insight(
                    db,
                    team_id=team_id,
                    text=f"insight {i}",
                    kind="risk" if i % 3 == 0 else "note",
                    session_id="s-even" if i % 2 == 0 else "s-odd",
                    source_message_id=f"m{i}",
                    author_kind="extractor",
                )
            )
    return made


async def test_insights_list_filters_and_history(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    made = await seed_insights(clean_server, team.team_id)
    listed = await read_all(client, "/dashboard/insights", h, limit=3)
    assert [i["id"] for i in listed] == [i.id for i in reversed(made)]
    first = listed[-1]
    assert first["text"] == "insight 0" and first["kind"] == "risk" and first["version"] == 1
    assert first["source_message_id"] == "m0" and first["session_id"] == "s-even"
    assert "created_at" in first
    risks = await read_all(client, "/dashboard/insights", h, kind="risk", limit=1)
    assert [i["text"] for i in risks] == ["insight 6", "insight 3", "insight 0"]
    odd = await read_all(client, "/dashboard/insights", h, session_id="s-odd")
    assert [i["text"] for i in odd] == ["insight 5", "insight 3", "insight 1"]
    both = await read_all(client, "/dashboard/insights", h, session_id="s-odd", kind="risk")
    assert [i["text"] for i in both] == ["insight 3"]
    bad = await client.get("/dashboard/insights", params={"kind": "Not A Kind"}, headers=h)
    assert bad.status_code == 400

    async with transaction(clean_server.state.sessionmaker) as db:
        await repo.update_insight(
            db,
            team_id=team.team_id,
            insight_id=made[0].id,
            expected_version=1,
            author_kind="user",
            author_id=None,
            text="insight 0, sharpened",
        )
    got = await client.get(f"/dashboard/insights/{made[0].id}", headers=h)
    assert got.json()["version"] == 2 and got.headers["etag"] == '"2"'
    assert got.json()["created_at"] == first["created_at"]
    history = await read_all(client, f"/dashboard/insights/{made[0].id}/history", h)
    assert [(i["version"], i["text"]) for i in history] == [
        (1, "insight 0"),
        (2, "insight 0, sharpened"),
    ]
    assert history[0] == first


async def test_states_put_list_and_history(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    values: list[Any] = [{"phase": "design"}, "  padded  ", [1, 2], None, 1, True]
    for n, value in enumerate(values, start=1):
        r = await client.put("/dashboard/states/project.phase", json={"value": value}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["value"] == value and r.json()["version"] == n
        assert r.headers["etag"] == f'"{n}"'
    await client.put("/dashboard/states/budget", json={"value": 1000}, headers=h)

    # The same value again writes no version.
    again = await client.put("/dashboard/states/budget", json={"value": 1000}, headers=h)
    assert again.json()["version"] == 1

    current = await read_all(client, "/dashboard/states", h, limit=1)
    assert [(s["key"], s["value"], s["version"]) for s in current] == [
        ("budget", 1000, 1),
        ("project.phase", True, 6),
    ]
    assert current[0]["updated_by"] == team.owner.member_id
    assert current[0]["author_kind"] == "user" and current[0]["updated_at"]
    single = await client.get("/dashboard/states/project.phase", headers=h)
    assert single.json() == current[1] and single.headers["etag"] == '"6"'

    history = await read_all(client, "/dashboard/states/project.phase/history", h, limit=4)
    assert [s["version"] for s in history] == [1, 2, 3, 4, 5, 6]
    assert [s["value"] for s in history] == values
    assert [type(s["value"]) for s in history[4:]] == [int, bool]


async def test_state_if_match_and_bad_input(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    url = "/dashboard/states/budget"
    assert (await client.put(url, json={"value": 1}, headers=h | {"If-Match": "0"})).json()[
        "version"
    ] == 1
    stale = await client.put(url, json={"value": 2}, headers=h | {"If-Match": "0"})
    assert stale.status_code == 409 and stale.json()["current_version"] == 1
    ok = await client.put(url, json={"value": 2}, headers=h | {"If-Match": '"1"'})
    assert ok.status_code == 200 and ok.json()["version"] == 2
    for body, headers in (
        ({}, h),
        ({"value": 3, "extra": 1}, h),
        ({"value": 3}, h | {"If-Match": "two"}),
    ):
        r = await client.put(url, json=body, headers=headers)
        assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
    r = await client.put("/dashboard/states/bad%20key!", json={"value": 1}, headers=h)
    assert r.status_code == 400
    r = await client.put("/dashboard/states/" + "k" * 201, json={"value": 1}, headers=h)
    assert r.status_code == 400
    history = await read_all(client, f"{url}/history", h)
    assert [s["value"] for s in history] == [1, 2]
    assert (await client.get("/dashboard/states/never-set/history", headers=h)).status_code == 404
    assert (await client.get("/dashboard/states/never-set", headers=h)).status_code == 404


async def test_dashboard_shows_everything_and_its_version_rises(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    empty = (await client.get("/dashboard", headers=h)).json()
    assert empty == {
        "version": 0,
        "counts": {"tasks": {"open": 0, "done": 0, "dropped": 0}, "insights": 0, "states": 0},
        "open_tasks": [],
        "open_tasks_by_owner": [],
        "recent_insights": [],
        "states": [],
        "summary": None,
    }
    later = await make_task(client, team, title="later", owner="bo", due="2030-06-01")
    await make_task(client, team, title="undated", owner="ana")
    soon = await make_task(client, team, title="soon", owner="ana", due="2030-01-15")
    dropped = await make_task(client, team, title="dropped")
    await client.patch(
        f"/dashboard/tasks/{dropped['id']}",
        json={"status": "dropped"},
        headers=h | {"If-Match": "1"},
    )
    await client.put("/dashboard/states/phase", json={"value": "build"}, headers=h)
    await seed_insights(clean_server, team.team_id)
    async with transaction(clean_server.state.sessionmaker) as db:
        await repo.add_summary(db, team_id=team.team_id, text="Building; two tasks for ana.")

    board = (await client.get("/dashboard", headers=h)).json()
    assert board["counts"] == {
        "tasks": {"open": 3, "done": 0, "dropped": 1},
        "insights": 7,
        "states": 1,
    }
    assert [t["title"] for t in board["open_tasks"]] == ["soon", "later", "undated"]
    assert board["open_tasks"][0] == soon and board["open_tasks"][1] == later
    assert board["open_tasks_by_owner"] == [{"owner": "ana", "open": 2}, {"owner": "bo", "open": 1}]
    assert [i["text"] for i in board["recent_insights"]][:2] == ["insight 6", "insight 5"]
    assert [(s["key"], s["value"]) for s in board["states"]] == [("phase", "build")]
    assert board["summary"]["text"] == "Building; two tasks for ana."
    assert board["summary"]["version"] == 1
    version = board["version"]
    assert version > 0

    # A no-op changes nothing; each real change raises the version.
    await client.put("/dashboard/states/phase", json={"value": "build"}, headers=h)
    assert (await client.get("/dashboard", headers=h)).json()["version"] == version
    await client.put("/dashboard/states/phase", json={"value": "ship"}, headers=h)
    after_state = (await client.get("/dashboard", headers=h)).json()["version"]
    await client.patch(
        f"/dashboard/tasks/{soon['id']}", json={"status": "done"}, headers=h | {"If-Match": "1"}
    )
    after_task = (await client.get("/dashboard", headers=h)).json()
    assert version < after_state < after_task["version"]
    assert after_task["counts"]["tasks"] == {"open": 2, "done": 1, "dropped": 1}


async def test_concurrent_creates_announce_distinct_rising_versions(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    """Tasks created all at once each announce a version of their own, in the
    order they commit: a subscriber that ignores an update whose version is
    not above the one it holds (the client rule) still ends up with every
    task. (On PostgreSQL creates used to count their version unlocked, so
    several announced the same one, out of order.)"""
    count = 30
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert (await ws.request({"type": "subscribe", "channel": "dashboard"}))["type"] == "ack"
        snapshot = await ws.expect("dashboard.snapshot")
        held = snapshot["version"]
        board = {t["id"]: t for t in snapshot["open_tasks"]}

        created = await asyncio.gather(
            *(make_task(client, team, title=f"task {i}") for i in range(count))
        )
        pushed: list[int] = []
        while len(pushed) < count:
            update = await ws.expect("dashboard.updated")
            pushed.append(update["version"])
            if update["version"] > held:
                held = update["version"]
                board |= {t["id"]: t for t in update["tasks"]}
    finally:
        await ws.close()

    assert len(set(pushed)) == count, pushed
    assert pushed == sorted(pushed), pushed
    listed = await read_all(client, "/dashboard/tasks", team.owner.headers, limit=100)
    assert set(board) == {t["id"] for t in listed} == {t["id"] for t in created}
    assert held == (await client.get("/dashboard", headers=team.owner.headers)).json()["version"]


async def test_a_write_that_changes_nothing_pushes_nothing(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    task = await make_task(client, team, owner="ana")
    assert (await client.put("/dashboard/states/phase", json={"value": 1}, headers=h)).is_success
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert (await ws.request({"type": "subscribe", "channel": "dashboard"}))["type"] == "ack"
        await ws.expect("dashboard.snapshot")
        noops = [
            client.patch(
                f"/dashboard/tasks/{task['id']}",
                json={"owner": "ana"},
                headers=h | {"If-Match": "1"},
            ),
            client.put("/dashboard/states/phase", json={"value": 1}, headers=h),
            client.put("/dashboard/states/phase", json={"value": 1}, headers=h | {"If-Match": "1"}),
        ]
        for noop in noops:
            r = await noop
            assert r.status_code == 200 and r.headers["etag"] == '"1"', r.text
        r = await client.put("/dashboard/states/phase", json={"value": 2}, headers=h)
        assert r.status_code == 200 and r.headers["etag"] == '"2"', r.text
        update = await ws.expect("dashboard.updated")
        assert [(s["key"], s["value"]) for s in update["states"]] == [("phase", 2)]
        assert "tasks" not in update
    finally:
        await ws.close()


async def test_concurrent_identical_state_writes_push_one_update(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    """Of several writes of one new value at once, the one that writes it
    announces it; the others find it there and push nothing."""
    h = team.owner.headers
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        assert (await ws.request({"type": "subscribe", "channel": "dashboard"}))["type"] == "ack"
        await ws.expect("dashboard.snapshot")
        for value in range(1, 6):
            puts = await asyncio.gather(
                *(
                    client.put("/dashboard/states/phase", json={"value": value}, headers=h)
                    for _ in range(8)
                )
            )
            assert {(r.status_code, r.json()["version"]) for r in puts} == {(200, value)}
        pong = await ws.request({"type": "ping"})
        assert pong["type"] == "pong"
    finally:
        await ws.close()
    updates = [f for f in ws.seen if f["type"] == "dashboard.updated"]
    assert [[s["value"] for s in u["states"]] for u in updates] == [[v] for v in range(1, 6)]
