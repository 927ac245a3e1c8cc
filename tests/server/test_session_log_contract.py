"""The SessionLog contract, on the in-process log and on Redis.

"Instances" are separate log objects on one Redis (a key prefix of their own
per test); for the memory log every instance is the same object, as every
socket of a single process shares it. Redis-only tests at the end cut the
connection (CLIENT KILL of the pub/sub connection, or a TCP proxy that drops
every connection and refuses new ones) and check nothing is lost.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chathub.server.redis_log import RedisSessionLog, ShardedSessionLog
from chathub.server.session_log import (
    Event,
    LogUnavailable,
    MemorySessionLog,
    SessionLog,
    StaleReply,
)
from tests.harness import REDIS_URL, eventually
from tests.proxy import RedisProxy

pytestmark = pytest.mark.timeout(60)

BACKENDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("sharded", marks=pytest.mark.redis),
]


def redis_db(url: str, db: int) -> str:
    """``url`` with another database number: a shard of its own (keys apart,
    and, as each shard publishes on a channel of its own, messages apart)."""
    parts = urlsplit(url)
    return parts._replace(path=f"/{db}").geturl()


SHARD_URLS = [REDIS_URL, redis_db(REDIS_URL, 1)]


async def drop_keys(prefix: str, url: str = REDIS_URL) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class Logs:
    """Makes "instances" of one backend that share their state."""

    backend: str
    prefix: str = field(default_factory=lambda: f"chathub-test-{secrets.token_hex(6)}")
    made: list[SessionLog] = field(default_factory=list)

    async def make(
        self,
        count: int = 1,
        *,
        max_length: int = 10_000,
        ttl_s: float = 86_400,
        url: str = REDIS_URL,
        ping_interval_s: float = 10.0,
        append_patience_s: float = 30.0,
    ) -> list[SessionLog]:
        if self.backend == "memory":
            shared = MemorySessionLog(max_length=max_length, ttl_s=ttl_s)
            self.made.append(shared)
            return [shared] * count
        options: dict[str, Any] = {
            "max_length": max_length,
            "ttl_s": ttl_s,
            "prefix": self.prefix,
            "reconnect_max_s": 0.2,
            "ping_interval_s": ping_interval_s,
            "append_patience_s": append_patience_s,
        }
        logs: list[SessionLog] = []
        for _ in range(count):
            log: RedisSessionLog | ShardedSessionLog = (
                ShardedSessionLog(SHARD_URLS, **options)
                if self.backend == "sharded"
                else RedisSessionLog(url, **options)
            )
            await log.start()
            self.made.append(log)
            logs.append(log)
        return logs

    async def one(self, **kwargs: Any) -> SessionLog:
        return (await self.make(1, **kwargs))[0]


@pytest.fixture(params=BACKENDS)
async def logs(request: pytest.FixtureRequest) -> AsyncIterator[Logs]:
    made = Logs(request.param)
    try:
        yield made
    finally:
        for log in made.made:
            await log.close()
        if made.backend == "redis":
            await drop_keys(made.prefix)
        if made.backend == "sharded":
            for url in SHARD_URLS:
                await drop_keys(made.prefix, url)


def new_session() -> str:
    return f"s-{secrets.token_hex(8)}"


class Collector:
    """A listener that keeps the events of one session."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        if event.session_id == self.session_id:
            self.events.append(event)

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]


# -- seq and delivery ------------------------------------------------------


async def test_concurrent_appends_on_three_instances_get_each_seq_once(logs: Logs) -> None:
    instances = await logs.make(3)
    sid = new_session()
    collectors = []
    for log in instances:
        collector = Collector(sid)
        log.add_listener(collector)
        collectors.append(collector)

    appended = await asyncio.gather(
        *(
            instances[i % 3].append(sid, "reply.delta", {"reply_id": "r1", "text": f"t{i}"})
            for i in range(300)
        )
    )

    assert sorted(e.seq for e in appended) == list(range(1, 301))
    by_seq = {e.seq: e for e in appended}
    for collector in collectors:
        await eventually(lambda c=collector: len(c.events) >= 300)  # type: ignore[misc]
        assert collector.seqs == list(range(1, 301))
        assert all(e == by_seq[e.seq] for e in collector.events)
    assert await instances[2].last_seq(sid) == 300
    # Each event's frame carries its own seq.
    assert all(e.data()["seq"] == e.seq for e in appended)


async def test_a_failing_listener_does_not_stop_the_others(logs: Logs) -> None:
    log = await logs.one()
    sid = new_session()

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    collector = Collector(sid)
    log.add_listener(broken)
    log.add_listener(collector)
    await log.append(sid, "message.created", {"message": {"id": "m1"}})
    await log.append(sid, "reply.started", {"reply_id": "r1"})
    await eventually(lambda: len(collector.events) == 2)
    assert collector.seqs == [1, 2]


async def test_sessions_are_numbered_independently(logs: Logs) -> None:
    log = await logs.one()
    a, b = new_session(), new_session()
    assert (await log.append(a, "x", {})).seq == 1
    assert (await log.append(a, "x", {})).seq == 2
    assert (await log.append(b, "x", {})).seq == 1
    assert await log.last_seq(a) == 2
    assert await log.last_seq(b) == 1
    assert await log.last_seq(new_session()) == 0


# -- read_after ------------------------------------------------------------


async def test_read_after_serves_what_a_reconnecting_client_missed(logs: Logs) -> None:
    writer, reader = await logs.make(2)
    sid = new_session()
    appended = [await writer.append(sid, "reply.delta", {"text": str(i)}) for i in range(5)]

    assert await reader.read_after(sid, 2) == appended[2:]
    assert await reader.read_after(sid, 0) == appended
    assert await reader.read_after(sid, 5) == []
    assert await reader.read_after(sid, 6) is None  # a seq from the future
    assert await reader.read_after(new_session(), 0) == []
    assert await reader.read_after(new_session(), 3) is None


async def test_read_after_reports_a_trimmed_window(logs: Logs) -> None:
    log = await logs.one(max_length=10)
    sid = new_session()
    appended = [await log.append(sid, "reply.delta", {"text": str(i)}) for i in range(300)]

    assert await log.read_after(sid, 0) is None
    assert await log.read_after(sid, 150) is None
    assert await log.read_after(sid, 295) == appended[295:]
    assert await log.read_after(sid, 290) == appended[290:]
    assert await log.read_after(sid, 300) == []


async def test_ensure_floor_keeps_seq_above_the_database(logs: Logs) -> None:
    log = await logs.one()
    sid = new_session()
    await log.ensure_floor(sid, 41)
    assert await log.last_seq(sid) == 41
    assert await log.read_after(sid, 41) == []
    assert (await log.append(sid, "x", {})).seq == 42

    await log.ensure_floor(sid, 10)  # lower: no effect
    assert (await log.append(sid, "x", {})).seq == 43
    await log.ensure_floor(sid, 43)  # equal: no effect
    assert (await log.append(sid, "x", {})).seq == 44
    # Events below the floor were never held here: a client behind it reloads.
    assert await log.read_after(sid, 5) is None


async def test_a_floor_above_held_events_is_never_read_across(logs: Logs) -> None:
    log = await logs.one()
    sid = new_session()
    for i in range(3):
        await log.append(sid, "x", {"n": i})
    await log.ensure_floor(sid, 20)
    after = await log.append(sid, "x", {"n": 3})
    assert after.seq == 21
    # Seqs 4 to 20 were skipped: no read may pretend it has them.
    assert await log.read_after(sid, 0) is None
    assert await log.read_after(sid, 3) is None
    assert await log.read_after(sid, 10) is None
    assert await log.read_after(sid, 20) == [after]
    assert await log.read_after(sid, 2) is None
    held = await log.held(sid)
    assert held[-1] == after and [e.seq for e in held] == sorted({e.seq for e in held})


async def test_held_is_every_event_still_held_in_order(logs: Logs) -> None:
    log = await logs.one(max_length=10)
    sid = new_session()
    assert await log.held(sid) == []
    appended = [await log.append(sid, "reply.delta", {"text": str(i)}) for i in range(5)]
    assert await log.held(sid) == appended
    appended += [await log.append(sid, "reply.delta", {"text": str(i)}) for i in range(5, 300)]
    held = await log.held(sid)
    # A window of at least max_length (Redis trims in whole blocks), the newest
    # events, contiguous.
    assert 10 <= len(held) < 300
    assert held == appended[-len(held) :]


async def test_an_idle_window_expires_but_seq_goes_on(logs: Logs) -> None:
    log = await logs.one(ttl_s=0.3)
    sid, other = new_session(), new_session()
    for _ in range(3):
        await log.append(sid, "x", {})
    await asyncio.sleep(0.5)
    await log.append(other, "x", {})  # the memory log expires on other activity

    assert await log.read_after(sid, 0) is None
    assert await log.last_seq(sid) == 3
    assert (await log.append(sid, "x", {})).seq == 4


async def test_the_memory_log_keeps_only_bounded_counters_of_expired_windows() -> None:
    """An expired window leaves its counter, and only the most recent
    ``max_counters`` of those: memory stays bounded however many sessions
    a long-lived server has seen (one older than that is floored again
    from the database before it is used)."""
    log = MemorySessionLog(ttl_s=0.05, max_counters=3)
    idle = [new_session() for _ in range(5)]
    for n, sid in enumerate(idle):
        for _ in range(n + 1):
            await log.append(sid, "x", {})
    await asyncio.sleep(0.1)
    await log.append(new_session(), "x", {})  # the memory log expires on other activity

    assert len(log._windows) == 1 and len(log._counters) == 3
    assert [await log.last_seq(sid) for sid in idle[2:]] == [3, 4, 5]  # counted on
    assert await log.last_seq(idle[0]) == 0  # forgotten
    assert (await log.append(idle[4], "x", {})).seq == 6


# -- frames ----------------------------------------------------------------

TEXTS = [
    "héllo wörld",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "日本語のテキスト и кириллица, עברית",
    'quotes " and \\ backslash, newline\nand tab\t, line sep \u2028 para \u2029',
    "nul \x00 and del \x7f and bom \ufeff",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
async def test_unicode_text_survives_byte_exact(logs: Logs, text: str) -> None:
    writer, reader = await logs.make(2)
    sid = new_session()
    collector = Collector(sid)
    reader.add_listener(collector)
    data = {"reply_id": "r1", "text": text, "nested": {"list": [1, 2.5, None, True, text]}}

    event = await writer.append(sid, "reply.delta", data)

    expected = Event.build(sid, event.seq, "reply.delta", data)
    assert event == expected
    assert event.data()["text"] == text
    assert (await reader.read_after(sid, 0)) == [expected]
    await eventually(lambda: len(collector.events) == 1)
    assert collector.events[0] == expected
    assert collector.events[0].frame.encode() == expected.frame.encode()


async def test_event_with_no_data_is_a_valid_frame(logs: Logs) -> None:
    log = await logs.one()
    sid = new_session()
    event = await log.append(sid, "ping", {})
    assert event.data() == {"type": "ping", "session_id": sid, "seq": 1}


# -- Redis only --------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.redis
@pytest.mark.parametrize("backend", ["redis", "sharded"])
async def test_the_redis_log_refuses_a_reply_s_events_once_it_no_longer_holds_the_session(
    backend: str,
) -> None:
    """The fence: only the session's current reply appends deltas, steps and
    guardrail events; its ending (by whichever instance) retires it and a
    newer reply replaces it. Endings themselves are not fenced: the database
    decides which ending is the one (a reaper's, or its owner's)."""
    logs = Logs(backend)
    try:
        first, other = await logs.make(2)
        sid = new_session()
        delta = {"reply_id": "r1", "text": "a"}
        await first.append(sid, "reply.delta", delta)  # no fence yet (a lost key): allowed
        await first.append(sid, "reply.started", {"reply_id": "r1"})
        await first.append(sid, "reply.delta", delta)
        await other.append(sid, "reply.failed", {"reply_id": "r1", "code": "interrupted"})
        with pytest.raises(StaleReply):
            await first.append(sid, "reply.delta", delta)
        await other.append(sid, "reply.started", {"reply_id": "r2"})
        for stale in ("reply.delta", "reply.step", "reply.guardrail"):
            with pytest.raises(StaleReply):
                await first.append(sid, stale, {"reply_id": "r1"})
        await other.append(sid, "reply.delta", {"reply_id": "r2", "text": "b"})
        # A late ending of the old reply does not retire the new one.
        await first.append(sid, "reply.failed", {"reply_id": "r1", "code": "internal"})
        await other.append(sid, "reply.delta", {"reply_id": "r2", "text": "c"})
        await first.append(sid, "message.created", {"message": {}})  # not a reply's event
        held = [e.type for e in await other.held(sid)]
        assert held == [
            "reply.delta",
            "reply.started",
            "reply.delta",
            "reply.failed",
            "reply.started",
            "reply.delta",
            "reply.failed",
            "reply.delta",
            "message.created",
        ]
    finally:
        for made in logs.made:
            await made.close()
        for url in SHARD_URLS if backend == "sharded" else [REDIS_URL]:
            await drop_keys(logs.prefix, url)


async def test_redis_keys_carry_the_ttl() -> None:
    logs = Logs("redis")
    try:
        log = await logs.one(ttl_s=120)
        assert isinstance(log, RedisSessionLog)
        sid = new_session()
        await log.append(sid, "x", {})
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            stream_ttl = await client.pttl(log.stream_key(sid))
            seq_ttl = await client.pttl(log.seq_key(sid))
        finally:
            await client.aclose()
        assert 0 < stream_ttl <= 120_000
        assert seq_ttl >= stream_ttl  # the counter outlives the window
    finally:
        for made in logs.made:
            await made.close()
        await drop_keys(logs.prefix)


async def pubsub_client_ids(name: str) -> list[int]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        clients = await client.client_list(_type="pubsub")
    finally:
        await client.aclose()
    return [int(c["id"]) for c in clients if c.get("name") == name]


async def kill_client(client_id: int) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.client_kill_filter(_id=str(client_id))
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_listener_keeps_delivering_after_its_connection_is_killed() -> None:
    logs = Logs("redis")
    try:
        reader, writer = await logs.make(2)
        assert isinstance(reader, RedisSessionLog)
        sid = new_session()
        collector = Collector(sid)
        reader.add_listener(collector)
        await writer.append(sid, "x", {"n": 0})
        await eventually(lambda: collector.seqs == [1])
        (old_id,) = await pubsub_client_ids(reader.subscription.name)

        await kill_client(old_id)
        # Appended while the reader is reconnecting, or just after.
        for n in range(1, 20):
            await writer.append(sid, "x", {"n": n})

        await eventually(lambda: len(collector.events) >= 20)
        assert collector.seqs == list(range(1, 21))
        assert [e.data()["n"] for e in collector.events] == list(range(20))
        await eventually(lambda: reader.subscription.connects == 2)
        new_ids = await pubsub_client_ids(reader.subscription.name)
        assert len(new_ids) == 1 and new_ids[0] != old_id
        assert await reader.ready()
        await writer.append(sid, "x", {"n": 20})
        await eventually(lambda: collector.seqs[-1] == 21)
    finally:
        for made in logs.made:
            await made.close()
        await drop_keys(logs.prefix)


async def timed(awaitable: Awaitable[Any]) -> float:
    started = time.monotonic()
    try:
        await awaitable
    except (RedisError, OSError, LogUnavailable):
        return time.monotonic() - started
    raise AssertionError("expected the call to fail while Redis is unreachable")


@pytest.mark.redis
async def test_outage_is_reported_and_events_from_it_are_recovered() -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    logs = Logs("redis")
    try:
        (watcher,) = await logs.make(1, url=proxy.url, append_patience_s=1.0)
        (writer,) = await logs.make(1)
        sid = new_session()
        assert isinstance(watcher, RedisSessionLog)
        collector = Collector(sid)
        watcher.add_listener(collector)
        # A socket joins the session on the watcher's instance.
        assert await watcher.last_seq(sid) == 0
        assert await watcher.ready()

        await proxy.cut()
        await eventually(lambda: not watcher.subscription.connected)
        assert not await watcher.ready()
        # Appending through a dead connection waits for Redis as long as
        # its patience, then gives up, instead of hanging.
        assert await timed(watcher.append(sid, "x", {})) < 5
        # The whole reply happens while the watcher is cut off: nothing later
        # would reveal a gap, so only the reconnection can recover it.
        for n in range(5):
            await writer.append(sid, "reply.delta", {"n": n})
        await writer.append(sid, "reply.completed", {"n": 5})
        await asyncio.sleep(0.3)
        assert collector.events == []

        await proxy.start()
        await eventually(lambda: len(collector.events) >= 6)
        assert await watcher.ready()
        assert collector.seqs == list(range(1, 7))
        assert collector.events[-1].type == "reply.completed"
        # Live delivery goes on, and the watcher's own pooled connections,
        # dropped by the outage, do not fail its first append.
        assert (await watcher.append(sid, "x", {})).seq == 7
        await writer.append(sid, "x", {})
        await eventually(lambda: collector.seqs[-2:] == [7, 8])
    finally:
        for made in logs.made:
            await made.close()
        await proxy.stop()
        await drop_keys(logs.prefix)


@pytest.mark.redis
async def test_an_append_whose_answer_was_lost_is_not_stored_twice() -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    logs = Logs("redis")
    try:
        (log,) = await logs.make(1, url=proxy.url)
        sid = new_session()
        first = await log.append(sid, "reply.delta", {"text": "Hello"})

        proxy.drop_next_reply()
        second = await log.append(sid, "reply.delta", {"text": " world"})

        assert second.seq == first.seq + 1
        held = await log.read_after(sid, 0)
        assert held is not None
        assert "".join(e.data()["text"] for e in held) == "Hello world"
        assert (await log.append(sid, "reply.completed", {})).seq == 3
    finally:
        for made in logs.made:
            await made.close()
        await proxy.stop()
        await drop_keys(logs.prefix)


@pytest.mark.redis
async def test_a_silent_partition_is_detected_and_healed() -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    logs = Logs("redis")
    try:
        (watcher,) = await logs.make(1, url=proxy.url, ping_interval_s=0.5)
        (writer,) = await logs.make(1)
        assert isinstance(watcher, RedisSessionLog)
        sid = new_session()
        collector = Collector(sid)
        watcher.add_listener(collector)
        assert await watcher.last_seq(sid) == 0

        proxy.freeze()
        # No error reaches the client: only the unanswered PING reveals it.
        await eventually(lambda: not watcher.subscription.connected, timeout_s=5)
        assert not await watcher.ready()
        await writer.append(sid, "reply.completed", {})

        proxy.thaw()
        await eventually(lambda: collector.seqs == [1], timeout_s=15)
        await eventually(lambda: watcher.subscription.connected)
        assert await watcher.ready()
    finally:
        proxy.thaw()
        for made in logs.made:
            await made.close()
        await proxy.stop()
        await drop_keys(logs.prefix)
