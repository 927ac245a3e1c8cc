"""A NUL in a socket frame, over a real socket on SQLite and PostgreSQL: an
``error`` frame naming the field, the socket stays open, nothing is stored.
(PostgreSQL refuses a NUL in text: such a frame used to crash the socket.)"""

from __future__ import annotations

import httpx

from tests.harness import RunningServer, TeamFixture
from tests.server.test_ws import new_session, stored_messages
from tests.wsclient import WsClient


async def test_a_nul_in_a_frame_is_an_error_and_the_socket_stays_open(
    clean_server: RunningServer, client: httpx.AsyncClient, team: TeamFixture
) -> None:
    sid = await new_session(client, team.owner)
    ws = await WsClient.connect(clean_server.ws_url, team.owner.api_key)
    try:
        send = {"type": "message.send", "session_id": sid, "client_msg_id": "c", "content": "hi"}
        for frame, field in (
            ({"type": "join", "session_id": "\x00"}, "session_id"),
            ({"type": "join", "session_id": sid[:-1] + "\x00"}, "session_id"),
            (send | {"content": "h\x00i"}, "content"),
            (send | {"client_msg_id": "c\x00"}, "client_msg_id"),
            (send | {"file_ids": ["\x00"]}, "file_ids[0]"),
            ({"type": "reply.cancel", "reply_id": "\x00"}, "reply_id"),
        ):
            err = await ws.request(frame)
            assert err["type"] == "error" and err["code"] == "bad_request", (frame, err)
            assert err["message"].startswith(field) and "NUL" in err["message"], err
            assert (await ws.request({"type": "ping"}))["type"] == "pong"
        joined = await ws.request({"type": "join", "session_id": sid})
        assert joined["type"] == "ack", joined
    finally:
        await ws.close()
    assert await stored_messages(client, team.owner, sid) == []
