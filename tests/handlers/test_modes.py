"""``/modes``: shipped modes and a team's own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.harness import TeamFixture

CUSTOM = {
    "name": "standup",
    "description": "Daily stand-up notes",
    "system_prompt": "Collect yesterday, today and blockers for each person.",
    "temperature": 0.3,
    "max_output_tokens": 256,
    "context_budget": 4096,
    "extraction": True,
}


async def test_shipped_modes_are_listed(client: httpx.AsyncClient, team: TeamFixture) -> None:
    r = await client.get("/modes", headers=team.owner.headers)
    assert r.status_code == 200
    modes = {m["name"]: m for m in r.json()["items"]}
    assert {"chat", "plan", "reflect", "summarise"} <= set(modes)
    assert all(m["source"] == "shipped" for m in modes.values())
    plan = modes["plan"]
    assert [step["name"] for step in plan["flow"]] == ["frame", "plan"]
    assert plan["flow"][0]["schema"]["required"] == ["goals", "constraints", "open_questions"]
    assert modes["summarise"]["extraction"] is False


async def test_team_mode_lifecycle(
    client: httpx.AsyncClient, team: TeamFixture, other_team: TeamFixture
) -> None:
    h = team.owner.headers
    r = await client.post("/modes", json=CUSTOM, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "team"
    assert (await client.get("/modes/standup", headers=h)).json()["system_prompt"] == CUSTOM[
        "system_prompt"
    ]
    # usable by sessions of this team only
    s = await client.post("/chat/sessions", json={"mode": "standup"}, headers=h)
    assert s.status_code == 201
    other = await client.post(
        "/chat/sessions", json={"mode": "standup"}, headers=other_team.owner.headers
    )
    assert other.status_code == 400
    assert (await client.get("/modes/standup", headers=other_team.owner.headers)).status_code == 404

    changed = CUSTOM | {"temperature": 0.9}
    r = await client.put("/modes/standup", json=changed, headers=h)
    assert r.status_code == 200 and r.json()["temperature"] == 0.9
    # not while a session uses it: its next message would find no mode
    in_use = await client.delete("/modes/standup", headers=h)
    assert in_use.status_code == 409 and in_use.json()["sessions"] == 1, in_use.text
    assert (await client.get("/modes/standup", headers=h)).status_code == 200
    sid = s.json()["id"]
    moved = await client.patch(f"/chat/sessions/{sid}", json={"mode": "chat"}, headers=h)
    assert moved.status_code == 200, moved.text
    assert (await client.delete("/modes/standup", headers=h)).status_code == 204
    assert (await client.get("/modes/standup", headers=h)).status_code == 404


async def test_mode_errors(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    member = await team.actor("member")
    assert (await client.post("/modes", json=CUSTOM, headers=member.headers)).status_code == 403
    assert (
        await client.post("/modes", json=CUSTOM | {"name": "chat"}, headers=h)
    ).status_code == 409
    await client.post("/modes", json=CUSTOM, headers=h)
    assert (await client.post("/modes", json=CUSTOM, headers=h)).status_code == 409
    bad_flow = CUSTOM | {
        "name": "x",
        "flow": [{"name": "a", "prompt": "p"}, {"name": "b", "prompt": "q"}],
    }
    r = await client.post("/modes", json=bad_flow, headers=h)
    assert r.status_code == 400 and "schema" in r.json()["detail"]
    for bad in (
        {"temperature": 5},
        {"unknown": 1},
        {"max_output_tokens": 9000, "context_budget": 4096},
    ):
        r = await client.post("/modes", json=CUSTOM | {"name": "y"} | bad, headers=h)
        assert r.status_code == 400, bad
    assert (
        await client.put("/modes/chat", json=CUSTOM | {"name": "chat"}, headers=h)
    ).status_code == 403
    assert (await client.delete("/modes/chat", headers=h)).status_code == 403
    assert (
        await client.put("/modes/standup", json=CUSTOM | {"name": "other"}, headers=h)
    ).status_code == 400
    names = {m["name"] for m in (await client.get("/modes", headers=h)).json()["items"]}
    assert "x" not in names and "y" not in names


def deep(depth: int) -> dict[str, Any]:
    """An object nested ``depth`` levels deep."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


FLOW = [{"name": "frame", "prompt": "p", "schema": {}}, {"name": "answer", "prompt": "q"}]

BAD_DOCUMENTS: dict[str, Any] = {
    # Each made a 500 once (an orjson TypeError from a model validator, or a
    # serialisation depth error at storing); each is a 400 now.
    "guardrails-300-deep": {"guardrails": deep(300)},
    "guardrails-beyond-64-bits": {"guardrails": {"injection_threshold": 10**30}},
    "schema-300-deep": {"flow": [FLOW[0] | {"schema": deep(300)}, FLOW[1]]},
}
# As written, for what json.dumps would not write.
BAD_RAW_DOCUMENTS = {
    "lone-surrogate": '"guardrails": {"blocklist": ["\\ud800"]}',
    "number-beyond-a-double": '"guardrails": {"injection_threshold": 1' + "0" * 400 + "}",
}


async def keep_a_mode(client: httpx.AsyncClient, h: dict[str, str]) -> None:
    r = await client.post("/modes", json=CUSTOM | {"name": "kept"}, headers=h)
    assert r.status_code == 201, r.text


async def assert_only_the_kept_mode(client: httpx.AsyncClient, h: dict[str, str]) -> None:
    modes = (await client.get("/modes", headers=h)).json()["items"]
    assert [m["name"] for m in modes if m["source"] == "team"] == ["kept"]
    kept = (await client.get("/modes/kept", headers=h)).json()
    assert kept["guardrails"] == {} and kept["flow"] == []


@pytest.mark.parametrize("bad", BAD_DOCUMENTS.values(), ids=BAD_DOCUMENTS.keys())
async def test_documents_that_cannot_be_stored_are_400(
    client: httpx.AsyncClient, team: TeamFixture, bad: dict[str, Any]
) -> None:
    h = team.owner.headers
    await keep_a_mode(client, h)
    r = await client.post("/modes", json=CUSTOM | {"name": "y"} | bad, headers=h)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    r = await client.put("/modes/kept", json=CUSTOM | {"name": "kept"} | bad, headers=h)
    assert r.status_code == 400, r.text
    await assert_only_the_kept_mode(client, h)


@pytest.mark.parametrize("bad", BAD_RAW_DOCUMENTS.values(), ids=BAD_RAW_DOCUMENTS.keys())
async def test_documents_that_are_not_strict_json_are_400(
    client: httpx.AsyncClient, team: TeamFixture, bad: str
) -> None:
    h = team.owner.headers | {"Content-Type": "application/json"}
    await keep_a_mode(client, h)
    for method, url, name in (("POST", "/modes", "y"), ("PUT", "/modes/kept", "kept")):
        body = json.dumps(CUSTOM | {"name": name})[:-1] + ", " + bad + "}"
        r = await client.request(method, url, content=body.encode(), headers=h)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    await assert_only_the_kept_mode(client, h)


async def test_a_schema_nested_within_the_limit_is_kept(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    flow = [FLOW[0] | {"schema": deep(30)}, FLOW[1]]
    r = await client.post("/modes", json=CUSTOM | {"name": "deep", "flow": flow}, headers=h)
    assert r.status_code == 201, r.text
    stored = (await client.get("/modes/deep", headers=h)).json()
    assert stored["flow"][0]["schema"] == deep(30)


ROUNDS = 30


async def test_a_session_is_never_left_in_a_mode_deleted_at_the_same_time(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    """Deleting a mode while a session is created in it, or changed to it:
    one of the two loses (the delete with 409, or the session's request with
    400), in every round. On PostgreSQL both used to succeed most rounds."""
    h = team.owner.headers
    for i in range(ROUNDS):
        name = f"raced{i}"
        r = await client.post("/modes", json=CUSTOM | {"name": name}, headers=h)
        assert r.status_code == 201, r.text
        if i % 2:
            sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
            put_in = client.patch(f"/chat/sessions/{sid}", json={"mode": name}, headers=h)
        else:
            put_in = client.post("/chat/sessions", json={"mode": name}, headers=h)
        session, deleted = await asyncio.gather(put_in, client.delete(f"/modes/{name}", headers=h))
        outcome = (session.status_code, deleted.status_code)
        assert outcome in ((200, 409), (201, 409), (400, 204)), (i, session.text, deleted.text)
        listed = await client.get("/chat/sessions", params={"mode": name}, headers=h)
        exists = (await client.get(f"/modes/{name}", headers=h)).status_code == 200
        assert bool(listed.json()["items"]) == exists, (i, outcome)
        if exists:  # leave no session in it, for the next rounds' listings
            for s in listed.json()["items"]:
                await client.delete(f"/chat/sessions/{s['id']}", headers=h)
