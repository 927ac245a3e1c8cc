"""Two deployments on one Redis server, each on a database of its own, do
not hear each other: Redis keeps keys per database but has one pub/sub
namespace, so the bus and the session log name their channels after the
database. Real Redis, the components as the app builds them from settings."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest
import redis.asyncio as aioredis

from chathub.config import Settings
from chathub.server.bus import create_bus
from chathub.server.session_log import Event, create_session_log
from tests.harness import REDIS_URL, eventually

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

BASE = REDIS_URL.rsplit("/", 1)[0] if REDIS_URL.count("/") > 2 else REDIS_URL


def settings_on(db: int) -> Settings:
    return Settings(redis_url=f"{BASE}/{db}", llm="scripted://")


def test_the_prefix_names_the_database_except_the_first() -> None:
    assert settings_on(0).redis_prefix == "chathub"
    assert settings_on(7).redis_prefix == "chathub:db7"
    assert Settings(redis_url=None, llm="scripted://").redis_prefix == "chathub"


async def test_buses_on_two_databases_do_not_hear_each_other() -> None:
    heard: dict[int, list[dict[str, Any]]] = {7: [], 8: []}
    buses = {db: create_bus(settings_on(db)) for db in heard}
    same_db = create_bus(settings_on(7))
    also: list[dict[str, Any]] = []
    try:
        for db, bus in buses.items():
            await bus.start()
            bus.subscribe("reply.cancel", heard[db].append)
        await same_db.start()
        same_db.subscribe("reply.cancel", also.append)
        await buses[7].publish("reply.cancel", {"reply_id": "r7"})
        await buses[8].publish("reply.cancel", {"reply_id": "r8"})
        await eventually(lambda: bool(heard[7] and heard[8] and also))
        await asyncio.sleep(0.2)  # anything crossing over would be here by now
        assert heard == {7: [{"reply_id": "r7"}], 8: [{"reply_id": "r8"}]}
        assert also == [{"reply_id": "r7"}]
    finally:
        for bus in [*buses.values(), same_db]:
            await bus.close()


async def test_session_logs_on_two_databases_do_not_hear_each_other() -> None:
    heard: dict[int, list[Event]] = {7: [], 8: []}
    logs = {db: create_session_log(settings_on(db)) for db in heard}
    session_id = f"s-{secrets.token_hex(6)}"
    try:
        for db, log in logs.items():
            log.add_listener(heard[db].append)
            await log.start()
        # The same session id on both: each deployment sees only its own.
        await logs[7].append(session_id, "reply.delta", {"text": "seven"})
        await logs[8].append(session_id, "reply.delta", {"text": "eight"})
        await eventually(lambda: bool(heard[7] and heard[8]))
        await asyncio.sleep(0.2)
        assert [json.loads(e.frame)["text"] for e in heard[7]] == ["seven"]
        assert [json.loads(e.frame)["text"] for e in heard[8]] == ["eight"]
    finally:
        for db, log in logs.items():
            await log.close()
            client = aioredis.from_url(settings_on(db).redis_url or "")
            prefix = settings_on(db).redis_prefix
            await client.delete(f"{prefix}:log:{{{session_id}}}", f"{prefix}:seq:{{{session_id}}}")
            await client.aclose()
