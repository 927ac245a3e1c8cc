"""Input no route can use, over real HTTP on SQLite and PostgreSQL: a NUL
anywhere (path, query, body), JSON that is not strict JSON, cursors that do
not fit their list, methods and media types a route does not take. Each is a
problem+json answer with its real status, never a 500, and writes nothing."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.harness import TeamFixture


def assert_problem(r: httpx.Response, status: int, detail: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["code"] == "bad_request", body
    if detail is not None:
        assert detail in body["detail"], body
    return body


@dataclass
class World:
    """One row of each kind, and what every list of the team says."""

    team: TeamFixture
    session_id: str
    task_id: str
    member_id: str

    @property
    def h(self) -> dict[str, str]:
        return self.team.owner.headers


LISTS = (
    "/chat/sessions",
    "/team/members",
    "/team/api-keys",
    "/dashboard/tasks",
    "/dashboard/states",
    "/files",
    "/modes",
)


async def snapshot(client: httpx.AsyncClient, world: World) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for path in (*LISTS, f"/chat/sessions/{world.session_id}/messages"):
        r = await client.get(path, params={"limit": 100}, headers=world.h)
        assert r.status_code == 200, (path, r.text)
        # last_used_at moves with use (once a minute), not with a write
        items = r.json()["items"]
        seen[path] = [{k: v for k, v in i.items() if k != "last_used_at"} for i in items]
    return seen


@pytest.fixture
async def world(client: httpx.AsyncClient, team: TeamFixture) -> World:
    h = team.owner.headers
    session = await client.post("/chat/sessions", json={"title": "kept"}, headers=h)
    task = await client.post("/dashboard/tasks", json={"title": "kept"}, headers=h)
    member = await client.post("/team/members", json={"email": "kept@example.com"}, headers=h)
    state = await client.put("/dashboard/states/kept", json={"value": 1}, headers=h)
    for r in (session, task, member, state):
        assert r.status_code in (200, 201), r.text
    return World(team, session.json()["id"], task.json()["id"], member.json()["id"])


# --- NUL in the path or the query ---------------------------------------------------

NUL_PATHS = [
    ("GET", "/chat/sessions/%00"),
    ("PATCH", "/chat/sessions/%00"),
    ("DELETE", "/chat/sessions/%00"),
    ("GET", "/chat/sessions/%00/messages"),
    ("POST", "/chat/sessions/%00/messages"),
    ("GET", "/team/members/%00"),
    ("PATCH", "/team/members/%00"),
    ("DELETE", "/team/members/%00"),
    ("DELETE", "/team/api-keys/%00"),
    ("GET", "/files/%00"),
    ("GET", "/files/%00/content"),
    ("DELETE", "/files/%00"),
    ("GET", "/dashboard/tasks/%00"),
    ("PATCH", "/dashboard/tasks/%00"),
    ("GET", "/dashboard/tasks/%00/history"),
    ("GET", "/dashboard/insights/%00"),
    ("GET", "/dashboard/insights/%00/history"),
    ("GET", "/dashboard/states/k%00"),
    ("PUT", "/dashboard/states/k%00"),
    ("GET", "/modes/%00"),
    ("PUT", "/modes/%00"),
    ("DELETE", "/modes/%00"),
]

BODIES = {
    "/chat/sessions/%00": {"title": "x"},
    "/chat/sessions/%00/messages": {"content": "hi"},
    "/team/members/%00": {"name": "x"},
    "/dashboard/tasks/%00": {"title": "x"},
    "/dashboard/states/k%00": {"value": 1},
    "/modes/%00": {"name": "x", "system_prompt": "p"},
}


@pytest.mark.parametrize(("method", "path"), NUL_PATHS, ids=[f"{m} {p}" for m, p in NUL_PATHS])
async def test_nul_in_a_path_is_400(
    client: httpx.AsyncClient, world: World, method: str, path: str
) -> None:
    before = await snapshot(client, world)
    body = BODIES.get(path) if method in ("POST", "PUT", "PATCH") else None
    r = await client.request(method, path, json=body, headers=world.h | {"If-Match": "1"})
    assert_problem(r, 400, "NUL")
    assert await snapshot(client, world) == before


NUL_QUERIES = [
    ("/chat/sessions", {"q": "\x00"}),
    ("/chat/sessions", {"q": "a\x00b"}),
    ("/files", {"q": "\x00"}),
    ("/files", {"session_id": "\x00"}),
    ("/files", {"content_type": "text/\x00"}),
    ("/dashboard/tasks", {"assignee": "\x00"}),
    ("/dashboard/tasks", {"owner": "\x00"}),
    ("/dashboard/tasks", {"session_id": "\x00"}),
    ("/dashboard/insights", {"kind": "\x00"}),
    ("/dashboard/insights", {"session_id": "\x00"}),
    ("/team/members", {"cursor": "\x00"}),
]


@pytest.mark.parametrize(("path", "params"), NUL_QUERIES, ids=[str(q) for q in NUL_QUERIES])
async def test_nul_in_a_query_is_400(
    client: httpx.AsyncClient, team: TeamFixture, path: str, params: dict[str, str]
) -> None:
    r = await client.get(path, params=params, headers=team.owner.headers)
    assert_problem(r, 400, "NUL")


# --- NUL in a JSON body -------------------------------------------------------------


MODE = {"name": "nul", "system_prompt": "p"}
SEND = "/chat/sessions/{sid}/messages"

# (method, path, body, the field the error names); {sid}, {tid} and {mid} are
# the world's session, task and member.
NUL_BODIES = [
    ("POST", "/chat/sessions", {"title": "a\x00"}, "title"),
    ("PATCH", "/chat/sessions/{sid}", {"title": "\x00"}, "title"),
    ("POST", SEND, {"content": "h\x00i"}, "content"),
    ("POST", SEND, {"content": "hi", "client_msg_id": "m\x00"}, "client_msg_id"),
    ("POST", SEND, {"content": "hi", "file_ids": ["f", "\x00"]}, "file_ids[1]"),
    ("POST", "/team/members", {"email": "n@example.com", "name": "\x00"}, "name"),
    ("PATCH", "/team/members/{mid}", {"name": "\x00"}, "name"),
    ("POST", "/team/api-keys", {"name": "k\x00"}, "name"),
    ("POST", "/team/api-keys", {"name": "k", "member_id": "\x00"}, "member_id"),
    ("POST", "/dashboard/tasks", {"title": "\x00"}, "title"),
    ("POST", "/dashboard/tasks", {"title": "t", "owner": "\x00"}, "owner"),
    ("POST", "/dashboard/tasks", {"title": "t", "session_id": "\x00"}, "session_id"),
    ("POST", "/dashboard/tasks", {"title": "t", "source_message_id": "\x00"}, "source_message_id"),
    ("PATCH", "/dashboard/tasks/{tid}", {"owner": "\x00"}, "owner"),
    ("PUT", "/dashboard/states/new", {"value": "\x00"}, "value"),
    ("PUT", "/dashboard/states/new", {"value": {"a": [1, "\x00"]}}, "value.a[1]"),
    ("PUT", "/dashboard/states/new", {"value": {"a\x00": 1}}, "value: a key"),
    ("POST", "/modes", MODE | {"description": "\x00"}, "description"),
    ("POST", "/modes", MODE | {"guardrails": {"blocklist": ["\x00"]}}, "guardrails.blocklist[0]"),
    ("PUT", "/modes/nul", MODE | {"system_prompt": "\x00"}, "system_prompt"),
    ("POST", "/auth/token", {"api_key": "chk_\x00"}, "api_key"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    NUL_BODIES,
    ids=[f"{m} {p} {f}" for m, p, _, f in NUL_BODIES],
)
async def test_nul_in_a_body_is_400_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, world: World, method: str, path: str, body: Any, field: str
) -> None:
    before = await snapshot(client, world)
    url = path.format(sid=world.session_id, tid=world.task_id, mid=world.member_id)
    r = await client.request(method, url, json=body, headers=world.h | {"If-Match": "1"})
    problem = assert_problem(r, 400, "NUL")
    assert problem["detail"].startswith(field), problem
    assert await snapshot(client, world) == before


# --- JSON that is not strict JSON ---------------------------------------------------

NOT_STRICT_JSON = {
    "nan": b'{"value": NaN}',
    "infinity": b'{"value": Infinity}',
    "minus-infinity": b'{"value": [1, -Infinity]}',
    "overflow": b'{"value": 1e400}',
    "huge-integer": b'{"value": 1' + b"0" * 400 + b"}",
    "lone-surrogate": b'{"value": "\\ud800"}',
    "not-json": b'{"value": 1',
}


@pytest.mark.parametrize("body", NOT_STRICT_JSON.values(), ids=NOT_STRICT_JSON.keys())
async def test_json_that_is_not_strict_is_400_and_writes_nothing(
    client: httpx.AsyncClient, world: World, body: bytes
) -> None:
    before = await snapshot(client, world)
    headers = world.h | {"Content-Type": "application/json"}
    r = await client.put("/dashboard/states/odd", content=body, headers=headers)
    assert_problem(r, 400, "not valid JSON")
    assert await snapshot(client, world) == before
    assert (await client.get("/dashboard/states/odd", headers=world.h)).status_code == 404


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_nesting_deeper_than_64_is_400(client: httpx.AsyncClient, world: World) -> None:
    h = world.h
    ok = await client.put("/dashboard/states/deep", json={"value": nested(63)}, headers=h)
    assert ok.status_code == 200, ok.text
    assert (await client.get("/dashboard/states/deep", headers=h)).json()["value"] == nested(63)
    before = await snapshot(client, world)
    r = await client.put("/dashboard/states/deep", json={"value": nested(64)}, headers=h)
    assert_problem(r, 400, "value: nested deeper than 64 levels")
    assert await snapshot(client, world) == before


# --- cursors ------------------------------------------------------------------------


def cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": key}).encode()).decode().rstrip("=")


BAD_CURSORS = [
    ("/chat/sessions", 1),  # an integer on a list keyed by string ids
    ("/team/members", True),
    ("/chat/sessions", "\x00"),
    ("/dashboard/states/kept/history", "zzz"),  # a string on a list keyed by versions
    ("/dashboard/states/kept/history", True),  # a bool is not an integer to SQL
    ("/dashboard/states/kept/history", 2**31),  # past the version column (32 bits)
    ("/dashboard/states/kept/history", -(2**31) - 1),
    ("/dashboard/states/kept/history", 2**63),
]


@pytest.mark.parametrize(("path", "key"), BAD_CURSORS, ids=[repr(c) for c in BAD_CURSORS])
async def test_a_cursor_that_does_not_fit_its_list_is_400(
    client: httpx.AsyncClient, world: World, path: str, key: Any
) -> None:
    r = await client.get(path, params={"cursor": cursor(key)}, headers=world.h)
    assert_problem(r, 400, "invalid cursor")


async def test_cursors_of_the_right_type_still_page(
    client: httpx.AsyncClient, world: World
) -> None:
    h = world.h
    for value in (2, 3):
        await client.put("/dashboard/states/kept", json={"value": value}, headers=h)
    history = "/dashboard/states/kept/history"
    for key, versions in ((-(2**31), [1, 2, 3]), (1, [2, 3]), (2**31 - 1, [])):
        r = await client.get(history, params={"cursor": cursor(key)}, headers=h)
        assert r.status_code == 200, r.text
        assert [s["version"] for s in r.json()["items"]] == versions
    r = await client.get("/chat/sessions", params={"cursor": cursor("~")}, headers=h)
    assert r.status_code == 200 and [s["id"] for s in r.json()["items"]] == [world.session_id]


# --- methods and media types --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/healthz", {"GET", "HEAD"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("DELETE", "/metrics", {"GET", "HEAD"}),
        ("OPTIONS", "/chat/sessions", {"GET", "HEAD"}),
        ("GET", "/auth/token", {"POST"}),
        ("HEAD", "/auth/token", {"POST"}),
    ],
)
async def test_a_method_the_path_does_not_serve_is_405_with_allow(
    client: httpx.AsyncClient, team: TeamFixture, method: str, path: str, allowed: set[str]
) -> None:
    r = await client.request(method, path, headers=team.owner.headers)
    assert r.status_code == 405, r.text
    assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers
    if method != "HEAD":
        assert_problem(r, 405, method)


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}],
    ids=["text", "form", "none"],
)
async def test_a_json_route_refuses_other_media_types_with_415(
    client: httpx.AsyncClient, world: World, headers: dict[str, str]
) -> None:
    before = await snapshot(client, world)
    r = await client.post("/chat/sessions", content=b'{"title": "x"}', headers=world.h | headers)
    assert_problem(r, 415, "application/json")
    assert await snapshot(client, world) == before


@pytest.mark.parametrize(
    "path", ["/healthz", "/chat/sessions", "/team/members", "/dashboard", "/modes/chat"]
)
async def test_head_answers_like_get_without_a_body(
    client: httpx.AsyncClient, team: TeamFixture, path: str
) -> None:
    get = await client.get(path, headers=team.owner.headers)
    head = await client.head(path, headers=team.owner.headers)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) == len(get.content)


async def test_head_needs_the_same_credentials_as_get(client: httpx.AsyncClient) -> None:
    r = await client.head("/chat/sessions")
    assert r.status_code == 401 and r.content == b""
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["www-authenticate"] == "Bearer"
