"""A long session: every request fits the budget, and older turns are
folded into a stored, versioned rolling summary."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import select

from chathub.storage.db import transaction
from chathub.storage.models import Message, SessionSummary
from tests.harness import RunningServer, TeamFixture

SMALL = {
    "name": "small",
    "system_prompt": "Be brief.",
    "max_output_tokens": 128,
    "context_budget": 1024,
}


async def _summaries(server: RunningServer, session_id: str) -> list[SessionSummary]:
    async with server.state.sessionmaker() as db:
        rows = await db.scalars(
            select(SessionSummary)
            .where(SessionSummary.session_id == session_id)
            .order_by(SessionSummary.version)
        )
        return list(rows)


async def test_500_turns_stay_within_budget_and_get_summarised(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    assert (await client.post("/modes", json=SMALL, headers=h)).status_code == 201
    sid = (await client.post("/chat/sessions", json={"mode": "small"}, headers=h)).json()["id"]
    async with transaction(clean_server.state.sessionmaker) as db:
        for i in range(500):
            db.add(
                Message(
                    team_id=team.team_id,
                    session_id=sid,
                    role="user" if i % 2 == 0 else "assistant",
                    content=f"turn {i} " + "words and more words " * 4,
                    status="complete",
                )
            )
    budget = SMALL["context_budget"] - SMALL["max_output_tokens"]

    r = await client.post(f"/chat/sessions/{sid}/messages", json={"content": "newest?"}, headers=h)
    assert r.status_code == 201, r.text
    reply = r.json()["reply"]
    assert reply["status"] == "complete"
    assert 0 < reply["usage"]["input_tokens"] <= budget
    assert reply["content"] == "You said: newest?"  # the newest turn reached the model

    for _ in range(200):
        found = await _summaries(clean_server, sid)
        if found:
            break
        await asyncio.sleep(0.05)
    assert [s.version for s in found] == [1]
    first = found[0]
    assert first.text

    r = await client.post(f"/chat/sessions/{sid}/messages", json={"content": "again"}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["reply"]["usage"]["input_tokens"] <= budget
    for _ in range(200):
        found = await _summaries(clean_server, sid)
        if len(found) == 2:
            break
        await asyncio.sleep(0.05)
    assert [s.version for s in found] == [1, 2]
    assert found[0].text == first.text  # versions are never rewritten
    assert found[1].covers_until > first.covers_until
