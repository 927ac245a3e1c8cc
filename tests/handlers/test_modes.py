"""``/modes``: shipped modes and a team's own."""

from __future__ import annotations

import httpx

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
