"""Extraction after replies, end to end: the model's tool answer (through a
fake-wire Anthropic server and the real SDK) or the markers become versioned
tasks, insights and states, pushed live to dashboard subscribers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from chathub.storage.db import transaction
from chathub.storage.repositories import dashboard as board
from tests.fakewire.anthropic_server import TextReply, ToolUseReply, serve_anthropic
from tests.harness import RunningServer, make_team, start_server, test_settings
from tests.wsclient import WsClient, reply_end

EXTRACTED = {
    "tasks": [{"title": "Ship the beta", "owner": "ana", "due": "2026-12-04", "status": "open"}],
    "insights": [{"text": "Beta users want dark mode", "kind": "insight"}],
    "states": [{"key": "beta.status", "value": "on track"}],
}


@pytest.fixture
async def anthropic_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningServer, object]]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    async with serve_anthropic() as wire:
        settings = test_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'c.db'}",
            tmp_path,
            llm=f"anthropic://claude-test?base_url={quote(wire.base_url, safe='')}",
            extraction_debounce_s=0.05,
        )
        server = await start_server(settings)
        try:
            yield server, wire
        finally:
            await server.stop()


async def _updates(ws: WsClient, want: set[str], timeout: float = 15) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while want - {k for u in got for k in u if k in ("tasks", "insights", "states", "summary")}:
            frame = await ws.recv()
            if frame["type"] == "dashboard.updated":
                got.append(frame)
    return got


@asynccontextmanager
async def markers_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server whose model gives an extraction answer that does not
    validate, so the deterministic markers are read instead."""
    bad = quote(json.dumps({"tasks": [{"title": "x", "due": "whenever"}]}))
    settings = test_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        tmp_path,
        llm=f"scripted://?text=Sure.&json={bad}",
        extraction_debounce_s=0.05,
    )
    server = await start_server(settings)
    try:
        yield server
    finally:
        await server.stop()


async def extraction_done(server: RunningServer) -> None:
    await asyncio.sleep(0.1)  # past the debounce
    for _ in range(200):
        if server.state.extractor.idle:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("extraction still running")


async def test_model_extraction_reaches_the_dashboard_live(
    anthropic_server: tuple[RunningServer, object],
) -> None:
    server, wire = anthropic_server
    team = await make_team(server.state)
    pieces = json.dumps(EXTRACTED)
    wire.enqueue(  # type: ignore[attr-defined]
        TextReply(["Noted: ", "Ana ships the beta."]),
        ToolUseReply("record_extraction", partial_json=[pieces[:40], pieces[40:]]),
    )
    wire.default = TextReply(["The beta is on track; Ana ships it by Dec 4."])  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=server.url) as client:
        h = team.owner.headers
        sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
        watcher = await WsClient.connect(server.ws_url, team.owner.api_key)
        ack = await watcher.request({"type": "subscribe", "channel": "dashboard"})
        assert ack["type"] == "ack"
        snapshot = await watcher.expect("dashboard.snapshot")
        assert snapshot["counts"]["tasks"]["open"] == 0

        chat = await WsClient.connect(server.ws_url, team.owner.api_key)
        await chat.request({"type": "join", "session_id": sid})
        sent = await chat.request(
            {
                "type": "message.send",
                "session_id": sid,
                "client_msg_id": "x1",
                "content": "Ana ships the beta",
            }
        )
        await chat.until(reply_end(sent["reply_id"]))

        updates = await _updates(watcher, {"tasks", "insights", "states", "summary"})
        versions = [u["version"] for u in updates]
        assert versions == sorted(versions) and versions[0] > snapshot["version"]
        first = updates[0]
        assert first["tasks"][0]["title"] == "Ship the beta"
        assert first["tasks"][0]["author_kind"] == "model"
        assert first["insights"][0]["text"] == "Beta users want dark mode"
        assert first["states"][0]["value"] == "on track"
        summary = next(u for u in updates if "summary" in u)
        assert summary["summary"]["text"].startswith("The beta is on track")

        tasks = (await client.get("/dashboard/tasks", headers=h)).json()["items"]
        assert [(t["title"], t["owner"], t["due"]) for t in tasks] == [
            ("Ship the beta", "ana", "2026-12-04")
        ]
        board = (await client.get("/dashboard", headers=h)).json()
        assert board["summary"]["text"] == summary["summary"]["text"]
        # the extraction request forced the tool
        tool_requests = [r.body for r in wire.requests if r.body and r.body.get("tool_choice")]  # type: ignore[attr-defined]
        assert tool_requests[0]["tool_choice"] == {"type": "tool", "name": "record_extraction"}

        # a person's change is pushed too, with a higher version
        task = tasks[0]
        r = await client.patch(
            f"/dashboard/tasks/{task['id']}",
            json={"status": "done"},
            headers=h | {"If-Match": str(task["version"])},
        )
        assert r.status_code == 200
        pushed = await _updates(watcher, {"tasks"})
        assert pushed[-1]["tasks"][0]["status"] == "done"
        assert pushed[-1]["version"] > versions[-1]
        await watcher.close()
        await chat.close()


async def test_invalid_model_json_falls_back_to_markers(tmp_path: Path) -> None:
    async with markers_server(tmp_path) as server:
        team = await make_team(server.state)
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
            r = await client.post(
                f"/chat/sessions/{sid}/messages",
                json={
                    "content": "TODO: renew the SSL certificate by friday\n"
                    "Decision: move to Postgres"
                },
                headers=h,
            )
            assert r.status_code == 201
            for _ in range(100):
                tasks = (await client.get("/dashboard/tasks", headers=h)).json()["items"]
                if tasks:
                    break
                await asyncio.sleep(0.05)
            assert [t["title"] for t in tasks] == ["renew the SSL certificate"]
            assert tasks[0]["author_kind"] == "extractor" and tasks[0]["due"]
            insights = (await client.get("/dashboard/insights", headers=h)).json()["items"]
            assert [(i["kind"], i["text"]) for i in insights] == [("decision", "move to Postgres")]
            # the same message again adds nothing (deduplicated)
            await client.post(
                f"/chat/sessions/{sid}/messages",
                json={"content": "TODO: renew the SSL certificate by friday"},
                headers=h,
            )
            await extraction_done(server)
            again = (await client.get("/dashboard/tasks", headers=h)).json()["items"]
            assert len(again) == 1 and again[0]["version"] == 1


async def test_one_change_is_enough_for_a_new_summary(
    anthropic_server: tuple[RunningServer, object],
) -> None:
    server, wire = anthropic_server
    team = await make_team(server.state)
    one_state = json.dumps({"tasks": [], "insights": [], "states": [EXTRACTED["states"][0]]})
    wire.enqueue(  # type: ignore[attr-defined]
        TextReply(["Noted."]),
        ToolUseReply("record_extraction", partial_json=[one_state]),
    )
    wire.default = TextReply(["The beta is on track."])  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=server.url) as client:
        h = team.owner.headers
        sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
        watcher = await WsClient.connect(server.ws_url, team.owner.api_key)
        await watcher.request({"type": "subscribe", "channel": "dashboard"})
        await watcher.expect("dashboard.snapshot")
        r = await client.post(
            f"/chat/sessions/{sid}/messages", json={"content": "the beta is on track"}, headers=h
        )
        assert r.status_code == 201
        updates = await _updates(watcher, {"states", "summary"})
        assert updates[0]["states"][0]["key"] == "beta.status"
        assert next(u for u in updates if "summary" in u)["summary"]["text"] == (
            "The beta is on track."
        )
        board = (await client.get("/dashboard", headers=h)).json()
        assert board["summary"]["text"] == "The beta is on track."
        await watcher.close()


async def test_an_old_open_task_mentioned_again_is_not_added_twice(tmp_path: Path) -> None:
    async with markers_server(tmp_path) as server:
        team = await make_team(server.state)
        async with transaction(server.state.sessionmaker) as db:
            for title in ["renew the SSL certificate"] + [f"chore number {i}" for i in range(150)]:
                await board.create_task(db, team_id=team.team_id, title=title, author_kind="user")
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
            r = await client.post(
                f"/chat/sessions/{sid}/messages",
                json={"content": "TODO: renew the SSL certificate"},
                headers=h,
            )
            assert r.status_code == 201
            await extraction_done(server)
            tasks: list[dict] = []
            params = {"limit": "100"}
            while True:
                page = (await client.get("/dashboard/tasks", params=params, headers=h)).json()
                tasks += page["items"]
                if not page.get("next_cursor"):
                    break
                params["cursor"] = page["next_cursor"]
        assert len(tasks) == 151
        assert [t["title"] for t in tasks].count("renew the SSL certificate") == 1


async def test_the_model_sees_numbered_messages_and_names_each_item_s(
    anthropic_server: tuple[RunningServer, object],
) -> None:
    server, wire = anthropic_server
    team = await make_team(server.state)
    answer = {
        "tasks": [EXTRACTED["tasks"][0] | {"message": 1}],
        "insights": EXTRACTED["insights"],  # no number: the first user message
        "states": [EXTRACTED["states"][0] | {"message": 2}],
    }
    wire.enqueue(  # type: ignore[attr-defined]
        TextReply(["Noted: ", "Ana ships the beta."]),
        ToolUseReply("record_extraction", partial_json=[json.dumps(answer)]),
    )
    wire.default = TextReply(["The beta is on track."])  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=server.url) as client:
        h = team.owner.headers
        sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
        r = await client.post(
            f"/chat/sessions/{sid}/messages", json={"content": "Ana ships the beta"}, headers=h
        )
        assert r.status_code == 201, r.text
        turn = r.json()
        await extraction_done(server)
        [task] = (await client.get("/dashboard/tasks", headers=h)).json()["items"]
        [insight] = (await client.get("/dashboard/insights", headers=h)).json()["items"]
        [state] = (await client.get("/dashboard/states", headers=h)).json()["items"]
    assert task["source_message_id"] == turn["message"]["id"]
    assert insight["source_message_id"] == turn["message"]["id"]
    assert state["source_message_id"] == turn["reply"]["id"]
    [request] = [r.body for r in wire.requests if r.body and r.body.get("tool_choice")]  # type: ignore[attr-defined]
    transcript = request["messages"][0]["content"]
    text = transcript if isinstance(transcript, str) else transcript[0]["text"]
    assert text.splitlines() == [
        "[#1 user] Ana ships the beta",
        "[#2 assistant] Noted: Ana ships the beta.",
    ]
    schema = request["tools"][0]["input_schema"]
    assert "message" in schema["properties"]["tasks"]["items"]["properties"]
