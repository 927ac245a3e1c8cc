"""What the app does once started, for a process that serves only it
(``chathub serve``): the startup heap is left out of later collections."""

from __future__ import annotations

import gc
from pathlib import Path

from chathub.server.app import create_app
from chathub.server.ws_protocol import uvicorn_settings
from tests.harness import serve, test_settings


async def _started(tmp_path: Path, *, freeze_heap: bool) -> int:
    settings = test_settings(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    app = create_app(settings, migrate=True, freeze_heap=freeze_heap)
    server, task, _port = await serve(app, lifespan="on", **uvicorn_settings(settings))
    try:
        return gc.get_freeze_count()
    finally:
        server.should_exit = True
        await task


async def test_a_served_app_freezes_what_startup_built(tmp_path: Path) -> None:
    gc.unfreeze()
    try:
        assert await _started(tmp_path / "plain", freeze_heap=False) == 0
        frozen = await _started(tmp_path / "frozen", freeze_heap=True)
        # the modules, mappers and app objects: far more than a collection
        # still has to scan afterwards
        assert frozen > 50_000
        assert len(gc.get_objects()) < frozen / 5
    finally:
        gc.unfreeze()  # the rest of the test run collects as usual
