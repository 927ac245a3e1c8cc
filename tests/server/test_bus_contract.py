"""The Bus contract, on the in-process bus and on Redis pub/sub.

For Redis, "instances" are separate RedisBus objects with a key prefix of
their own per test; for the memory bus they are one object.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from chathub.server.bus import Bus, MemoryBus
from chathub.server.redis_bus import RedisBus, RedisSubscription
from tests.harness import REDIS_URL
from tests.proxy import RedisProxy
from tests.server.test_session_log_contract import (
    eventually,
    kill_client,
    pubsub_client_ids,
)

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@dataclass
class Buses:
    backend: str
    prefix: str = field(default_factory=lambda: f"chathub-test-{secrets.token_hex(6)}")
    made: list[Bus] = field(default_factory=list)

    async def make(self, count: int = 1, *, url: str = REDIS_URL) -> list[Bus]:
        if self.backend == "memory":
            shared = MemoryBus()
            self.made.append(shared)
            return [shared] * count
        buses: list[Bus] = []
        for _ in range(count):
            bus = RedisBus(url, prefix=self.prefix, reconnect_max_s=0.2)
            await bus.start()
            self.made.append(bus)
            buses.append(bus)
        return buses


@pytest.fixture(params=BACKENDS)
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[Buses]:
    made = Buses(request.param)
    try:
        yield made
    finally:
        for bus in made.made:
            await bus.close()


async def test_publish_reaches_handlers_on_every_instance(buses: Buses) -> None:
    instances = await buses.make(3)
    received: list[list[dict[str, Any]]] = [[], [], []]
    for i, bus in enumerate(instances):
        bus.subscribe("reply.cancel", received[i].append)
    message = {"reply_id": "r-1", "note": "annulé ✋🏽", "n": [1, 2.5, None]}

    await instances[0].publish("reply.cancel", message)

    for got in received:
        await eventually(lambda got=got: len(got) == 1)  # type: ignore[misc]
        assert got == [message]


async def test_channels_are_separate(buses: Buses) -> None:
    (bus,) = await buses.make()
    cancels: list[dict[str, Any]] = []
    dashboards: list[dict[str, Any]] = []
    bus.subscribe("reply.cancel", cancels.append)
    bus.subscribe("dashboard", dashboards.append)

    await bus.publish("dashboard", {"team_id": "t1"})
    await bus.publish("reply.cancel", {"reply_id": "r1"})

    await eventually(lambda: len(cancels) == 1 and len(dashboards) == 1)
    assert cancels == [{"reply_id": "r1"}]
    assert dashboards == [{"team_id": "t1"}]


async def test_unsubscribe_stops_delivery_and_is_idempotent(buses: Buses) -> None:
    publisher, subscriber = await buses.make(2)
    gone: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    unsubscribe = subscriber.subscribe("reply.cancel", gone.append)
    subscriber.subscribe("reply.cancel", kept.append)
    await publisher.publish("reply.cancel", {"n": 1})
    await eventually(lambda: len(gone) == 1 and len(kept) == 1)

    unsubscribe()
    unsubscribe()
    await publisher.publish("reply.cancel", {"n": 2})
    await publisher.publish("reply.cancel", {"n": 3})

    # In order on one connection: once 3 arrived, 2 would have too.
    await eventually(lambda: len(kept) == 3)
    assert [m["n"] for m in kept] == [1, 2, 3]
    assert [m["n"] for m in gone] == [1]


async def test_async_handlers_run(buses: Buses) -> None:
    (bus,) = await buses.make()
    done = asyncio.Event()
    seen: list[str] = []

    async def on_cancel(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        seen.append(message["reply_id"])
        done.set()

    def sync_too(message: dict[str, Any]) -> None:
        seen.append("sync:" + message["reply_id"])

    bus.subscribe("reply.cancel", on_cancel)
    bus.subscribe("reply.cancel", sync_too)
    await bus.publish("reply.cancel", {"reply_id": "r9"})
    await asyncio.wait_for(done.wait(), 5)
    await eventually(lambda: len(seen) == 2)
    assert sorted(seen) == ["r9", "sync:r9"]


async def test_a_failing_handler_does_not_stop_the_others(buses: Buses) -> None:
    (bus,) = await buses.make()
    got: list[dict[str, Any]] = []

    def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    async def broken_async(message: dict[str, Any]) -> None:
        raise RuntimeError("async handler bug")

    bus.subscribe("x", broken)
    bus.subscribe("x", broken_async)
    bus.subscribe("x", got.append)
    await bus.publish("x", {"a": 1})
    await bus.publish("x", {"a": 2})
    await eventually(lambda: len(got) == 2)
    assert got == [{"a": 1}, {"a": 2}]


async def test_each_handler_gets_its_own_copy(buses: Buses) -> None:
    (bus,) = await buses.make()
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []

    def popping(message: dict[str, Any]) -> None:
        message.pop("team_id")
        first.append(message)

    bus.subscribe("dashboard", popping)
    bus.subscribe("dashboard", second.append)
    await bus.publish("dashboard", {"team_id": "t1", "version": 3})
    await eventually(lambda: len(second) == 1)
    if buses.backend == "redis":
        assert second == [{"team_id": "t1", "version": 3}]
    assert first == [{"version": 3}]


async def test_ready(buses: Buses) -> None:
    (bus,) = await buses.make()
    assert await bus.ready()


@pytest.mark.redis
async def test_bus_resubscribes_after_its_connection_is_killed() -> None:
    buses = Buses("redis")
    try:
        subscriber, publisher = await buses.make(2)
        assert isinstance(subscriber, RedisBus)
        got: list[dict[str, Any]] = []
        subscriber.subscribe("reply.cancel", got.append)
        (old_id,) = await pubsub_client_ids(subscriber.subscription.name)

        await kill_client(old_id)
        await eventually(lambda: subscriber.subscription.connects == 2)
        await eventually(lambda: subscriber.subscription.connected)

        await publisher.publish("reply.cancel", {"reply_id": "after"})
        await eventually(lambda: got == [{"reply_id": "after"}])
        (new_id,) = await pubsub_client_ids(subscriber.subscription.name)
        assert new_id != old_id
        assert await subscriber.ready()
    finally:
        for bus in buses.made:
            await bus.close()


@pytest.mark.redis
async def test_bus_reports_an_outage_and_recovers() -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    buses = Buses("redis")
    try:
        (subscriber,) = await buses.make(url=proxy.url)
        (publisher,) = await buses.make()
        assert isinstance(subscriber, RedisBus)
        got: list[dict[str, Any]] = []
        subscriber.subscribe("reply.cancel", got.append)
        assert await subscriber.ready()

        await proxy.cut()
        await eventually(lambda: not subscriber.subscription.connected)
        assert not await subscriber.ready()

        await proxy.start()
        await eventually(lambda: subscriber.subscription.connected)
        assert await subscriber.ready()
        await publisher.publish("reply.cancel", {"reply_id": "r2"})
        await eventually(lambda: got == [{"reply_id": "r2"}])
    finally:
        for bus in buses.made:
            await bus.close()
        await proxy.stop()


@pytest.mark.redis
async def test_a_subscription_measures_how_late_it_reads() -> None:
    role = f"lag-{secrets.token_hex(3)}"

    def observed(above: str | None = None) -> float:
        count = REGISTRY.get_sample_value("chathub_bus_lag_seconds_count", {"subscription": role})
        if above is None:
            return count or 0.0
        within = REGISTRY.get_sample_value(
            "chathub_bus_lag_seconds_bucket", {"subscription": role, "le": above}
        )
        return (count or 0.0) - (within or 0.0)

    channel = f"chathub-test-{secrets.token_hex(4)}"
    handled: list[bytes] = []

    async def slow_handler(_channel: bytes, data: bytes) -> None:
        await asyncio.sleep(0.4)
        handled.append(data)

    subscription = RedisSubscription(
        REDIS_URL, channels=[channel], on_message=slow_handler, role=role, lag_probe_s=0.05
    )
    publisher = aioredis.Redis.from_url(REDIS_URL)
    try:
        await subscription.start()
        # Quiet: a probe every 0.05 s, each answered at once.
        await eventually(lambda: observed() >= 3)
        assert observed(above="0.5") == 0
        # Three messages at once, 0.4 s each to handle: a probe sent after
        # the first is read after the other two, at least 0.8 s late.
        for n in range(3):
            await publisher.publish(channel, f"m{n}")
        await eventually(lambda: len(handled) == 3)
        await eventually(lambda: observed(above="0.5") >= 1)
    finally:
        await subscription.close()
        await publisher.aclose()
