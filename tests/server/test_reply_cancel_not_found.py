"""``reply.cancel`` of a reply the caller's team does not have answers one
and the same ``not_found``, whether the id is unknown or names another
team's reply running right now: the answer tells nothing about the others."""

from __future__ import annotations

from pathlib import Path

from tests.harness import make_team
from tests.server.test_ws import custom_server, new_session, scripted, send_message
from tests.wsclient import WsClient, reply_end

SLOW_TEXT = "".join(f"word{i:03d} " for i in range(80))  # 640 characters, 4 s


async def test_another_team_s_running_reply_is_as_unknown_as_an_unknown_id(
    tmp_path: Path,
) -> None:
    llm = scripted(text=SLOW_TEXT, chunk=4, rate=40)
    async with custom_server(tmp_path, llm=llm) as served:
        owner = served.team.owner
        other = (await make_team(served.server.state, "Globex")).owner
        sid = await new_session(served.client, owner)
        ws = await WsClient.connect(served.server.ws_url, owner.api_key)
        intruder = await WsClient.connect(served.server.ws_url, other.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            reply_id = (await send_message(ws, sid, "c1"))["reply_id"]
            await ws.until(lambda f: f["type"] == "reply.delta")
            running = await intruder.request({"type": "reply.cancel", "reply_id": reply_id})
            unknown = await intruder.request({"type": "reply.cancel", "reply_id": "no-such-id"})
            end = (await ws.until(reply_end(reply_id)))[-1]
        finally:
            await ws.close()
            await intruder.close()
    assert end["stop_reason"] == "end_turn"  # the other team stopped nothing
    assert running["type"] == unknown["type"] == "error"
    assert running["code"] == unknown["code"] == "not_found"
    assert running["message"] == unknown["message"], (running, unknown)
