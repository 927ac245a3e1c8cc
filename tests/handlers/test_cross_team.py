"""Nothing of one team is visible or changeable by another.

A data-driven matrix: each :class:`Resource` says how team A makes one row,
how A reads it, which list shows it, and what team B tries against it. For
every resource, B's owner (the highest role, so that no ``403`` can hide the
answer) gets ``404`` on each attempt, never sees A's row in its lists, and A
reads the row exactly as before. To cover a new route, add a ``Resource``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as dashboard_repo
from tests.harness import RunningServer, TeamFixture

Params = dict[str, str]


@dataclass(frozen=True)
class World:
    client: httpx.AsyncClient
    server: RunningServer
    a: TeamFixture
    b: TeamFixture

    async def a_post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        r = await self.client.post(path, headers=self.a.owner.headers, **kwargs)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def a_session(self) -> str:
        return str((await self.a_post("/chat/sessions", json={"title": "A only"}))["id"])


@dataclass(frozen=True)
class Attempt:
    """What B tries; path and body are formatted with A's ``Params``."""

    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: int = 404

    def render(self, params: Params) -> tuple[str, Any]:
        return self.path.format(**params), _fill(self.body, params)


@dataclass(frozen=True)
class Resource:
    name: str
    create: Callable[[World], Awaitable[Params]]
    """Makes A's row; returns the values its paths are formatted with."""
    reads: tuple[str, ...]
    """A's GETs whose answers must not change."""
    attempts: tuple[Attempt, ...]
    listing: str | None = None
    """The team-wide list that shows the row to A and must not show it to B."""
    match: str | None = "id"
    """The item field equal to ``params["id"]``; None: B's list must not hold A's item."""
    list_filters: tuple[dict[str, str], ...] = ({},)
    needs: str | None = None
    """An OpenAPI path this resource needs; the case is skipped, loudly, without it."""


def _fill(body: Any, params: Params) -> Any:
    if isinstance(body, str):
        return body.format(**params)
    if isinstance(body, dict):
        return {k: _fill(v, params) for k, v in body.items()}
    if isinstance(body, list):
        return [_fill(v, params) for v in body]
    return body


# ---- how team A makes each kind of row -----------------------------------------------


async def make_session(w: World) -> Params:
    return {"id": await w.a_session(), "title": "A only"}


async def make_message(w: World) -> Params:
    sid = await w.a_session()
    r = await w.client.post(
        f"/chat/sessions/{sid}/messages",
        json={"content": "hello from A", "client_msg_id": "a-1"},
        headers=w.a.owner.headers,
    )
    assert r.status_code == 201, r.text
    return {"sid": sid, "id": r.json()["message"]["id"]}


async def make_member(w: World) -> Params:
    body = await w.a_post("/team/members", json={"email": "a-only@example.com", "role": "admin"})
    return {"id": body["id"]}


async def make_api_key(w: World) -> Params:
    body = await w.a_post("/team/api-keys", json={"name": "A's key", "role": "member"})
    return {"id": body["id"], "member_id": body["member_id"]}


async def make_file(w: World) -> Params:
    sid = await w.a_session()
    body = await w.a_post(
        "/files",
        files={"file": ("plans.txt", b"A's secret plans", "text/plain")},
        data={"session_id": sid},
    )
    return {"id": body["id"], "sid": sid}


async def make_task(w: World) -> Params:
    sid = await w.a_session()
    body = await w.a_post(
        "/dashboard/tasks", json={"title": "A's task", "owner": "ann", "session_id": sid}
    )
    return {"id": body["id"], "sid": sid}


async def make_insight(w: World) -> Params:
    # insights come from extraction only; make one the way the extractor stores it
    async with transaction(w.server.state.sessionmaker) as db:
        view = await dashboard_repo.create_insight(
            db, team_id=w.a.team_id, text="A's insight", author_kind="extractor"
        )
    return {"id": view.id}


async def make_state(w: World) -> Params:
    r = await w.client.put(
        "/dashboard/states/budget", json={"value": {"eur": 1000}}, headers=w.a.owner.headers
    )
    assert r.status_code == 200, r.text
    return {"key": "budget"}


async def make_mode(w: World) -> Params:
    await w.a_post(
        "/modes", json={"name": "a-secret-mode", "system_prompt": "You are A's assistant."}
    )
    return {"id": "a-secret-mode", "name": "a-secret-mode"}


GET, PATCH, DELETE, POST, PUT = "GET", "PATCH", "DELETE", "POST", "PUT"

RESOURCES = [
    Resource(
        "session",
        make_session,
        reads=("/chat/sessions/{id}",),
        listing="/chat/sessions",
        list_filters=({}, {"q": "A only"}),
        attempts=(
            Attempt(GET, "/chat/sessions/{id}"),
            Attempt(PATCH, "/chat/sessions/{id}", {"title": "pwned", "archived": True}),
            Attempt(DELETE, "/chat/sessions/{id}"),
        ),
    ),
    Resource(
        "session messages",
        make_message,
        reads=("/chat/sessions/{sid}/messages", "/chat/sessions/{sid}"),
        attempts=(
            Attempt(GET, "/chat/sessions/{sid}/messages"),
            Attempt(POST, "/chat/sessions/{sid}/messages", {"content": "hi", "client_msg_id": "b"}),
            # a retry of A's own client_msg_id must not hand B A's stored turn
            Attempt(
                POST, "/chat/sessions/{sid}/messages", {"content": "x", "client_msg_id": "a-1"}
            ),
        ),
    ),
    Resource(
        "member",
        make_member,
        reads=("/team/members/{id}",),
        listing="/team/members",
        list_filters=({}, {"role": "admin"}),
        attempts=(
            Attempt(GET, "/team/members/{id}"),
            Attempt(PATCH, "/team/members/{id}", {"role": "viewer", "name": "pwned"}),
            Attempt(DELETE, "/team/members/{id}"),
            Attempt(POST, "/team/api-keys", {"name": "backdoor", "member_id": "{id}"}),
        ),
    ),
    Resource(
        "api key",
        make_api_key,
        reads=(),
        listing="/team/api-keys",
        attempts=(
            Attempt(DELETE, "/team/api-keys/{id}"),
            Attempt(POST, "/team/api-keys", {"name": "backdoor", "member_id": "{member_id}"}),
        ),
    ),
    Resource(
        "file",
        make_file,
        reads=("/files/{id}", "/files/{id}/content"),
        listing="/files",
        list_filters=({}, {"q": "plans"}, {"session_id": "{sid}"}),
        needs="/files/{file_id}",
        attempts=(
            Attempt(GET, "/files/{id}"),
            Attempt(GET, "/files/{id}/content"),
            Attempt(DELETE, "/files/{id}"),
        ),
    ),
    Resource(
        "task",
        make_task,
        reads=("/dashboard/tasks/{id}", "/dashboard/tasks/{id}/history"),
        listing="/dashboard/tasks",
        list_filters=({}, {"session_id": "{sid}"}, {"assignee": "ann"}),
        needs="/dashboard/tasks/{task_id}",
        attempts=(
            Attempt(GET, "/dashboard/tasks/{id}"),
            Attempt(GET, "/dashboard/tasks/{id}/history"),
            Attempt(PATCH, "/dashboard/tasks/{id}", {"status": "done"}, {"If-Match": "1"}),
        ),
    ),
    Resource(
        "insight",
        make_insight,
        reads=("/dashboard/insights/{id}", "/dashboard/insights/{id}/history"),
        listing="/dashboard/insights",
        needs="/dashboard/insights/{insight_id}",
        attempts=(
            Attempt(GET, "/dashboard/insights/{id}"),
            Attempt(GET, "/dashboard/insights/{id}/history"),
        ),
    ),
    Resource(
        "state",
        make_state,
        reads=("/dashboard/states/{key}", "/dashboard/states/{key}/history"),
        listing="/dashboard/states",
        match=None,  # keys are per team: B may have a "budget" of its own
        needs="/dashboard/states/{key}",
        attempts=(
            Attempt(GET, "/dashboard/states/{key}"),
            Attempt(GET, "/dashboard/states/{key}/history"),
            # B writing the same key makes B's own state, and A's stays as it was
            Attempt(PUT, "/dashboard/states/{key}", {"value": "B's"}, expect=200),
        ),
    ),
    Resource(
        "mode",
        make_mode,
        reads=("/modes/{name}",),
        listing="/modes",
        match="name",
        needs="/modes/{name}",
        attempts=(
            Attempt(GET, "/modes/{name}"),
            Attempt(
                PUT,
                "/modes/{name}",
                {"name": "{name}", "system_prompt": "You are B's now."},
            ),
            Attempt(DELETE, "/modes/{name}"),
            Attempt(POST, "/chat/sessions", {"mode": "{name}"}, expect=400),
        ),
    ),
]


# ---- the matrix ----------------------------------------------------------------------


async def list_all(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], params: dict[str, str]
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = params | {"limit": "100"} | ({"cursor": cursor} if cursor else {})
        r = await client.get(path, params=query, headers=headers)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json().get("next_cursor")
        if cursor is None:
            return items
    raise AssertionError(f"{path} never ran out of pages")


async def a_view(w: World, resource: Resource, params: Params) -> list[Any]:
    """Everything A can observe of its row."""
    view: list[Any] = []
    for path in resource.reads:
        r = await w.client.get(path.format(**params), headers=w.a.owner.headers)
        assert r.status_code == 200, r.text
        is_json = r.headers["content-type"].startswith("application/json")
        view.append((path, r.json() if is_json else r.content))
    if resource.listing is not None:
        view.append(("list", a_item(resource, params, await a_listing(w, resource, params))))
    return view


async def a_listing(w: World, resource: Resource, params: Params) -> list[dict[str, Any]]:
    assert resource.listing is not None
    return await list_all(w.client, resource.listing, w.a.owner.headers, {})


def a_item(resource: Resource, params: Params, items: list[dict[str, Any]]) -> dict[str, Any]:
    if resource.match is not None:
        found = [i for i in items if i[resource.match] == params["id"]]
    else:
        found = [i for i in items if i.get("key") == params["key"]]
    assert len(found) == 1, f"A's own list should show its {resource.name} once"
    return found[0]


@pytest.fixture
async def world(
    client: httpx.AsyncClient,
    clean_server: RunningServer,
    team: TeamFixture,
    other_team: TeamFixture,
) -> World:
    return World(client, clean_server, team, other_team)


@pytest.fixture
async def routes(client: httpx.AsyncClient) -> set[str]:
    return set((await client.get("/openapi.json")).json()["paths"])


@pytest.mark.parametrize("resource", RESOURCES, ids=[r.name for r in RESOURCES])
async def test_other_team_gets_404_and_changes_nothing(
    world: World, routes: set[str], resource: Resource
) -> None:
    if resource.needs is not None and resource.needs not in routes:
        pytest.skip(f"{resource.needs} is not served yet")
    w = world
    params = await resource.create(w)
    before = await a_view(w, resource, params)

    for attempt in resource.attempts:
        path, body = attempt.render(params)
        r = await w.client.request(
            attempt.method,
            path,
            json=body,
            headers=w.b.owner.headers | attempt.headers,
        )
        assert r.status_code == attempt.expect, (attempt.method, path, r.text)
        if attempt.expect >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")
        if attempt.expect == 404:
            assert r.json()["code"] == "not_found"

    if resource.listing is not None:
        mine = a_item(resource, params, await a_listing(w, resource, params))
        for filters in resource.list_filters:
            query = {k: v.format(**params) for k, v in filters.items()}
            theirs = await list_all(w.client, resource.listing, w.b.owner.headers, query)
            if resource.match is not None:
                assert params["id"] not in {i[resource.match] for i in theirs}, query
            else:
                assert mine not in theirs, query

    assert await a_view(w, resource, params) == before


async def test_b_sees_only_its_own_rows(world: World, routes: set[str]) -> None:
    """After A makes one of everything, B's lists hold only what B made."""
    w = world
    for resource in RESOURCES:
        if resource.needs is None or resource.needs in routes:
            await resource.create(w)
    b_session = (
        await w.client.post("/chat/sessions", json={"title": "B"}, headers=w.b.owner.headers)
    ).json()["id"]
    sessions = await list_all(w.client, "/chat/sessions", w.b.owner.headers, {})
    assert [s["id"] for s in sessions] == [b_session]
    members = await list_all(w.client, "/team/members", w.b.owner.headers, {})
    assert [m["id"] for m in members] == [w.b.owner.member_id]
    keys = await list_all(w.client, "/team/api-keys", w.b.owner.headers, {})
    assert [k["id"] for k in keys] == [w.b.owner.api_key_id]
    for path in ("/files", "/dashboard/tasks", "/dashboard/insights", "/dashboard/states"):
        if path in routes:
            assert await list_all(w.client, path, w.b.owner.headers, {}) == [], path
    if "/modes" in routes:
        modes = await list_all(w.client, "/modes", w.b.owner.headers, {})
        assert "a-secret-mode" not in {m["name"] for m in modes}
        assert {m["source"] for m in modes} == {"shipped"}


# ---- another team's ids inside a body -------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """B names A's row inside a request of its own: refused (400 or 404), and
    the list B would have added to is unchanged."""

    name: str
    create: Callable[[World], Awaitable[Params]]
    attempt: Attempt
    listing: str
    needs: str | None = None


REFERENCES = [
    Reference(
        "file attached to a session of A",
        make_session,
        Attempt(POST, "/files", expect=404),
        listing="/files",
        needs="/files/{file_id}",
    ),
    Reference(
        "task in a session of A",
        make_session,
        Attempt(POST, "/dashboard/tasks", {"title": "t", "session_id": "{id}"}, expect=400),
        listing="/dashboard/tasks",
        needs="/dashboard/tasks/{task_id}",
    ),
    Reference(
        "task from a message of A",
        make_message,
        Attempt(POST, "/dashboard/tasks", {"title": "t", "source_message_id": "{id}"}, expect=400),
        listing="/dashboard/tasks",
        needs="/dashboard/tasks/{task_id}",
    ),
    Reference(
        "message attaching a file of A",
        make_file,
        Attempt(
            POST,
            "/chat/sessions/{b_sid}/messages",
            {"content": "summarise this", "file_ids": ["{id}"]},
            expect=404,
        ),
        listing="/chat/sessions/{b_sid}/messages",
        needs="/files/{file_id}",
    ),
]


@pytest.mark.parametrize("ref", REFERENCES, ids=[r.name for r in REFERENCES])
async def test_other_teams_ids_in_a_body_are_refused(
    world: World, routes: set[str], ref: Reference
) -> None:
    if ref.needs is not None and ref.needs not in routes:
        pytest.skip(f"{ref.needs} is not served yet")
    w = world
    b_sid = (
        await w.client.post("/chat/sessions", json={"title": "B"}, headers=w.b.owner.headers)
    ).json()["id"]
    params = await ref.create(w) | {"b_sid": b_sid}
    listing = ref.listing.format(**params)
    before = await list_all(w.client, listing, w.b.owner.headers, {})

    path, body = ref.attempt.render(params)
    if ref.attempt.path == "/files":
        r = await w.client.post(
            path,
            files={"file": ("x.txt", b"B's bytes", "text/plain")},
            data={"session_id": params["id"]},
            headers=w.b.owner.headers,
        )
    else:
        r = await w.client.request(ref.attempt.method, path, json=body, headers=w.b.owner.headers)
    assert r.status_code == ref.attempt.expect, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert await list_all(w.client, listing, w.b.owner.headers, {}) == before
