"""The welcome is always a socket's first frame, however busy the hub is."""

from __future__ import annotations

import json
from pathlib import Path

import websockets

from tests.harness import make_team, start_server, test_settings


async def test_welcome_comes_before_any_heartbeat(tmp_path: Path) -> None:
    server = await start_server(
        test_settings(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", tmp_path, ws_heartbeat_s=0.001)
    )
    try:
        team = await make_team(server.state)
        for _ in range(20):
            async with websockets.connect(
                server.ws_url, additional_headers=team.owner.headers
            ) as ws:
                first = json.loads(await ws.recv())
                assert first["type"] == "welcome", first
                second = json.loads(await ws.recv())
                assert second["type"] == "heartbeat"
    finally:
        await server.stop()
