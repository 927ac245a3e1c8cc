"""Reasoning flows: the ``plan`` mode runs a structured step, then streams."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.harness import RunningServer, TeamFixture
from tests.server.test_ws import custom_server, scripted
from tests.wsclient import WsClient, reply_end


async def test_plan_mode_runs_its_flow_and_keeps_a_trace(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={"mode": "plan"}, headers=h)).json()["id"]
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    await ws.request({"type": "join", "session_id": sid})
    ack = await ws.request(
        {
            "type": "message.send",
            "session_id": sid,
            "client_msg_id": "p1",
            "content": "Launch the beta by Friday; Ana owns QA.",
        }
    )
    frames = await ws.until(reply_end(ack["reply_id"]))
    await ws.close()
    by_type = {f["type"]: f for f in ws.seen}
    assert by_type["reply.started"]["steps"] == ["frame", "plan"]
    assert by_type["reply.step"]["step"] == "frame"
    assert frames[-1]["type"] == "reply.completed"
    text = "".join(f["text"] for f in ws.seen if f["type"] == "reply.delta")
    assert frames[-1]["message"]["content"] == text and text
    assert "trace" not in frames[-1]["message"]

    history = (await client.get(f"/chat/sessions/{sid}/messages", headers=h)).json()["items"]
    reply = next(m for m in history if m["role"] == "assistant")
    step = reply["trace"]["steps"][0]
    assert step["step"] == "frame"
    assert set(step["output"]) >= {"goals", "constraints", "open_questions"}

    member = await team.actor("member")
    seen_by_member = (
        await client.get(f"/chat/sessions/{sid}/messages", headers=member.headers)
    ).json()
    assert all(m["trace"] is None for m in seen_by_member["items"])


async def test_the_finished_turn_over_rest_keeps_the_trace_for_admins(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    """``POST …/messages`` answered as JSON (and its retry) shows the trace
    as the history does: to admins only."""
    member = await team.actor("member")
    h = member.headers
    sid = (await client.post("/chat/sessions", json={"mode": "plan"}, headers=h)).json()["id"]
    body = {"content": "Launch the beta by Friday; Ana owns QA.", "client_msg_id": "p1"}
    first = await client.post(f"/chat/sessions/{sid}/messages", json=body, headers=h)
    retry = await client.post(f"/chat/sessions/{sid}/messages", json=body, headers=h)
    assert (first.status_code, retry.status_code) == (201, 200)
    for turn in (first.json(), retry.json()):
        assert turn["reply"]["content"] and turn["reply"]["trace"] is None
    as_owner = await client.post(
        f"/chat/sessions/{sid}/messages", json=body, headers=team.owner.headers
    )
    assert as_owner.json()["reply"]["trace"]["steps"][0]["step"] == "frame"


async def test_a_steps_output_passes_the_output_guardrail_in_the_trace(
    tmp_path: Path,
) -> None:
    """What a structured step produced is model output, kept with the reply:
    redacted like the streamed text."""
    framed = {
        "goals": ["Email ana.lopez@example.com the launch plan"],
        "constraints": ["Card 4111 1111 1111 1111 pays for the venue"],
        "open_questions": [],
    }
    async with custom_server(tmp_path, llm=scripted(json=json.dumps(framed))) as s:
        h = s.team.owner.headers
        sid = (await s.client.post("/chat/sessions", json={"mode": "plan"}, headers=h)).json()["id"]
        body = {"content": "Plan the launch", "client_msg_id": "p1"}
        turn = await s.client.post(f"/chat/sessions/{sid}/messages", json=body, headers=h)
        assert turn.status_code == 201, turn.text
    [step] = turn.json()["reply"]["trace"]["steps"]
    assert step["output"] == {
        "goals": ["Email [redacted:email] the launch plan"],
        "constraints": ["Card [redacted:card] pays for the venue"],
        "open_questions": [],
    }
