"""Replies never end silently: one left streaming by a stopped embedded
server is ended as interrupted when the server starts again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from chathub.storage.db import transaction
from chathub.storage.models import Message
from tests.harness import make_team, start_server, test_settings


async def test_a_reply_left_streaming_is_ended_at_the_next_start(tmp_path: Path) -> None:
    settings = test_settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", tmp_path)
    first = await start_server(settings)
    team = await make_team(first.state)
    h = team.owner.headers
    async with httpx.AsyncClient(base_url=first.url) as client:
        sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    # What a crash mid-reply leaves behind: the reply's row, still streaming.
    async with transaction(first.state.sessionmaker) as db:
        db.add(
            Message(
                id="0" * 8 + "-dead-7000-8000-000000000000",
                team_id=team.team_id,
                session_id=sid,
                role="assistant",
                content="",
                status="streaming",
            )
        )
    await first.stop()

    second = await start_server(settings)
    try:
        async with httpx.AsyncClient(base_url=second.url) as client:
            for _ in range(100):
                items = (await client.get(f"/chat/sessions/{sid}/messages", headers=h)).json()
                if items["items"] and items["items"][0]["status"] != "streaming":
                    break
                await asyncio.sleep(0.05)
            reply = items["items"][0]
            assert reply["status"] == "failed" and reply["stop_reason"] == "error"
            # and the session takes new messages
            r = await client.post(
                f"/chat/sessions/{sid}/messages", json={"content": "hi"}, headers=h
            )
            assert r.status_code == 201 and r.json()["reply"]["status"] == "complete"
    finally:
        await second.stop()
