"""``/chat/sessions`` over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest

from chathub.handlers.sessions import accepts_event_stream
from tests.harness import TeamFixture


async def test_create_get_patch_delete(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    created = await client.post(
        "/chat/sessions", json={"title": "Plan Q3", "mode": "plan"}, headers=h
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["title"] == "Plan Q3" and body["mode"] == "plan"
    assert body["archived"] is False and body["last_seq"] == 0
    assert body["created_at"].endswith("Z") or "+00:00" in body["created_at"]

    got = await client.get(f"/chat/sessions/{body['id']}", headers=h)
    assert got.json() == body

    patched = await client.patch(
        f"/chat/sessions/{body['id']}", json={"archived": True, "title": "Q3"}, headers=h
    )
    assert patched.status_code == 200
    assert patched.json()["archived"] is True and patched.json()["title"] == "Q3"

    deleted = await client.delete(f"/chat/sessions/{body['id']}", headers=h)
    assert deleted.status_code == 204
    gone = await client.get(f"/chat/sessions/{body['id']}", headers=h)
    assert gone.status_code == 404
    assert gone.headers["content-type"].startswith("application/problem+json")
    assert gone.json()["code"] == "not_found"


async def test_pagination_has_no_duplicates_or_gaps(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    made = set()
    for i in range(23):
        r = await client.post("/chat/sessions", json={"title": f"s{i}"}, headers=h)
        made.add(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/chat/sessions", params=params, headers=h)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 5
        seen += [s["id"] for s in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == made
    assert seen == sorted(seen, reverse=True)  # newest first


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"mode": "plan"}, {"plan-a", "plan-b"}),
        ({"archived": "true"}, {"plan-b"}),
        ({"archived": "false"}, {"plan-a", "Chat about 50% off"}),
        ({"q": "50%"}, {"Chat about 50% off"}),
        ({"q": "PLAN"}, {"plan-a", "plan-b"}),
    ],
)
async def test_filters(
    client: httpx.AsyncClient, team: TeamFixture, params: dict[str, str], expected: set[str]
) -> None:
    h = team.owner.headers
    await client.post("/chat/sessions", json={"title": "plan-a", "mode": "plan"}, headers=h)
    b = await client.post("/chat/sessions", json={"title": "plan-b", "mode": "plan"}, headers=h)
    await client.patch(f"/chat/sessions/{b.json()['id']}", json={"archived": True}, headers=h)
    await client.post("/chat/sessions", json={"title": "Chat about 50% off"}, headers=h)
    r = await client.get("/chat/sessions", params=params, headers=h)
    assert {s["title"] for s in r.json()["items"]} == expected


@pytest.mark.parametrize(
    "body",
    [
        {"title": 5},
        {"mode": "Not A Mode!"},
        {"title": "x", "unknown": 1},
        {"title": "x" * 501},
        [],
    ],
)
async def test_bad_bodies_are_400_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, body: object
) -> None:
    h = team.owner.headers
    r = await client.post("/chat/sessions", json=body, headers=h)
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    listed = await client.get("/chat/sessions", headers=h)
    assert listed.json()["items"] == []


async def test_malformed_json(client: httpx.AsyncClient, team: TeamFixture) -> None:
    r = await client.post(
        "/chat/sessions",
        content=b'{"title": ',
        headers=team.owner.headers | {"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "params", [{"cursor": "!!!"}, {"cursor": "e30"}, {"limit": 0}, {"limit": 101}]
)
async def test_bad_paging(
    client: httpx.AsyncClient, team: TeamFixture, params: dict[str, object]
) -> None:
    r = await client.get("/chat/sessions", params=params, headers=team.owner.headers)
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"


async def test_viewer_reads_but_cannot_write(client: httpx.AsyncClient, team: TeamFixture) -> None:
    viewer = await team.actor("viewer")
    r = await client.post("/chat/sessions", json={}, headers=viewer.headers)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    s = await client.post("/chat/sessions", json={}, headers=team.owner.headers)
    sid = s.json()["id"]
    assert (await client.get(f"/chat/sessions/{sid}", headers=viewer.headers)).status_code == 200
    for call in (
        client.patch(f"/chat/sessions/{sid}", json={"title": "x"}, headers=viewer.headers),
        client.delete(f"/chat/sessions/{sid}", headers=viewer.headers),
    ):
        assert (await call).status_code == 403


async def test_messages_history_is_empty_then_404_for_unknown(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    s = await client.post("/chat/sessions", json={}, headers=h)
    r = await client.get(f"/chat/sessions/{s.json()['id']}/messages", headers=h)
    assert r.json() == {"items": [], "next_cursor": None}
    r = await client.get("/chat/sessions/does-not-exist/messages", headers=h)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("accept", "streams"),
    [
        ("text/event-stream", True),
        ("application/json, TEXT/Event-Stream; charset=utf-8", True),
        ("text/event-stream;q=0.5", True),
        ("text/event-stream;q=0", False),
        ("text/event-stream; q=0.0, application/json", False),
        ("text/event-stream;q=nope", False),
        ("*/*", False),
        ("application/json", False),
        ("", False),
    ],
)
def test_the_accept_header_asks_for_a_stream_only_by_name_and_above_q0(
    accept: str, streams: bool
) -> None:
    assert accepts_event_stream(accept) is streams
