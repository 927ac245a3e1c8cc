"""The Redis bus, and the pub/sub connection that the Redis backends share.

:class:`RedisSubscription` keeps one pub/sub connection subscribed: after a
connection error it reconnects with exponential backoff (with jitter),
subscribes again, waits for Redis to confirm, and only then calls
``on_connect`` and reads messages again. Messages published while it was
disconnected are lost (pub/sub is at most once); ``on_connect`` is where a
user repairs that (the session log re-reads its streams there).

:class:`RedisBus` publishes JSON on ``<prefix>:bus:<channel>`` and reads every
bus channel through one pattern subscription (``<prefix>:bus:*``), so a
``subscribe`` takes effect at once, without a round trip to Redis. Its
users repair what a reconnection lost in :meth:`RedisBus.on_reconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chathub.server import metrics
from chathub.server.bus import Handler, ReconnectHandler

log = logging.getLogger("chathub.bus")
redis_log = logging.getLogger("chathub.redis")

MessageCallback = Callable[[bytes, bytes], Awaitable[None]]
ConnectCallback = Callable[[bool], Awaitable[None]]

# Errors that mean "the connection is gone": reconnect.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


T = TypeVar("T")


POOL_SIZE = 256
POOL_WAIT_S = 5.0
LAG_PROBE_S = 5.0
LAG_PROBE = b"chathub-lag"


def redis_client(url: str, *, name: str | None = None) -> aioredis.Redis:
    """A client that fails fast and never retries by itself: a blindly
    retried script could run twice (an event appended twice), and a pub/sub
    connection quietly reconnected inside redis-py would hide the messages
    lost meanwhile. Callers retry explicitly: with :func:`retry_once`, or,
    for the session log's appends, for as long as its patience (each try
    after the first looks for the first one's token before appending).

    Its pool blocks: past ``POOL_SIZE`` commands in flight (a burst of joins
    after a deploy) a command waits up to ``POOL_WAIT_S`` for a connection
    instead of failing at once, as redis-py's default pool (100) does."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        client_name=name,
    )
    return aioredis.Redis.from_pool(pool)


async def retry_once(call: Callable[[bool], Awaitable[T]]) -> T:
    """``call(False)``, and once more, ``call(True)``, if the connection
    dropped. A pooled connection that Redis closed (restart, failover, idle
    timeout) fails its next command; the second try gets a fresh one. The
    flag lets a non-idempotent ``call`` recognise its own first attempt."""
    try:
        return await call(False)
    except RedisConnectionError:
        return await call(True)


def glob_escape(text: str) -> str:
    """Escape Redis glob characters so ``text`` matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisSubscription:
    """One pub/sub connection that stays subscribed to ``patterns`` and
    ``channels``, handing each message to ``on_message(channel, data)``.

    ``on_connect(reconnected)`` runs once Redis has confirmed every
    subscription of a (re)connection and before its first message is read:
    anything published after Redis processed the subscription is delivered
    afterwards, in publish order. An error raised by ``on_connect`` counts as
    a connection error (reconnect and try again); an error raised by
    ``on_message`` is logged and the message skipped.
    """

    def __init__(
        self,
        url: str,
        *,
        on_message: MessageCallback,
        patterns: Sequence[str] = (),
        channels: Sequence[str] = (),
        on_connect: ConnectCallback | None = None,
        name: str = "chathub",
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 5.0,
        ping_interval_s: float = 10.0,
        role: str = "bus",
        lag_probe_s: float = LAG_PROBE_S,
    ) -> None:
        """``role`` labels its ``chathub_bus_lag_seconds``, measured every
        ``lag_probe_s``."""
        self.name = name
        self._url = url
        self._patterns = list(patterns)
        self._channels = list(channels)
        self._on_message = on_message
        self._on_connect = on_connect
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._ping_interval_s = ping_interval_s
        self._lag = metrics.BUS_LAG.labels(subscription=role)
        self._lag_probe_s = lag_probe_s
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.connects = 0  # successful (re)subscriptions, for tests and metrics

    @property
    def connected(self) -> bool:
        """True while subscribed on a live connection."""
        return self._subscribed.is_set()

    async def start(self, wait_s: float = 5.0) -> None:
        """Start reading; wait up to ``wait_s`` for the first subscription.
        An unreachable Redis does not fail the start: the reader keeps
        trying and :attr:`connected` stays False meanwhile."""
        if self._task is not None:
            return
        self._client = redis_client(self._url, name=self.name)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        try:
            async with asyncio.timeout(wait_s):
                await self._subscribed.wait()
        except TimeoutError:
            redis_log.warning("%s: Redis not reachable yet; retrying in the background", self.name)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _run(self) -> None:
        failures = 0
        while True:
            assert self._client is not None
            pubsub = self._client.pubsub()
            try:
                await self._subscribe(pubsub)
                self.connects += 1
                if self._on_connect is not None:
                    await self._on_connect(self.connects > 1)
                self._subscribed.set()
                failures = 0
                await self._read(pubsub)
            except Exception as exc:
                was_connected = self._subscribed.is_set()
                self._subscribed.clear()
                if isinstance(exc, CONNECTION_ERRORS):
                    if was_connected or failures == 0:
                        redis_log.warning(
                            "%s: Redis connection lost (%s); reconnecting", self.name, exc
                        )
                else:
                    redis_log.exception("%s: subscription failed; reconnecting", self.name)
                await _close_quietly(pubsub)
                delay = min(self._reconnect_max_s, self._reconnect_min_s * 2**failures)
                failures += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            finally:
                self._subscribed.clear()
                await _close_quietly(pubsub)

    async def _subscribe(self, pubsub: aioredis.client.PubSub) -> None:
        expected = 0
        if self._patterns:
            await pubsub.psubscribe(*self._patterns)
            expected += len(self._patterns)
        if self._channels:
            await pubsub.subscribe(*self._channels)
            expected += len(self._channels)
        async with asyncio.timeout(self._ping_interval_s):
            while expected:
                message = await pubsub.get_message(timeout=self._ping_interval_s)
                if message is None:
                    continue
                kind = message["type"]
                if kind in ("psubscribe", "subscribe"):
                    expected -= 1
                elif kind in ("pmessage", "message"):
                    # Published after our subscription was processed.
                    await self._dispatch(message)

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        """Read until the connection fails. After ``ping_interval_s`` of
        silence a PING goes out; no answer within as long again means the
        connection is dead even if TCP has not noticed. Every
        ``lag_probe_s`` a PING of its own measures the lag: its answer
        comes after every message published before it."""
        loop = asyncio.get_running_loop()
        poll_s = min(1.0, self._ping_interval_s / 2, self._lag_probe_s)
        heard = probed = loop.time()
        pinged_at: float | None = None
        probe_sent: float | None = None
        while True:
            message = await pubsub.get_message(timeout=poll_s)
            now = loop.time()
            if probe_sent is None and now - probed >= self._lag_probe_s:
                await pubsub.ping(LAG_PROBE)
                probe_sent = now
            if message is None:
                if pinged_at is not None:
                    if now - pinged_at > self._ping_interval_s:
                        raise TimeoutError("no answer to PING on the pub/sub connection")
                elif now - heard > self._ping_interval_s:
                    await pubsub.ping()
                    pinged_at = now
                continue
            heard, pinged_at = now, None
            kind = message["type"]
            if kind in ("pmessage", "message"):
                await self._dispatch(message)
            elif kind == "pong" and probe_sent is not None and message["data"] == LAG_PROBE:
                self._lag.observe(now - probe_sent)
                probe_sent, probed = None, now

    async def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        data = message["data"]
        if isinstance(channel, str):
            channel = channel.encode()
        if isinstance(data, str):
            data = data.encode()
        try:
            await self._on_message(channel, data)
        except CONNECTION_ERRORS:
            raise
        except Exception:
            redis_log.exception("%s: message handler failed", self.name)


class RedisBus:
    """The bus over Redis pub/sub: at most once, to every instance (this one
    included) that has a handler for the channel when the message arrives.

    Sync handlers run in arrival order on the reader task; an async handler
    runs as its own task, so a slow one does not hold up other messages.
    Each handler receives its own decoded copy of the message.

    Messages published while the subscription was down are lost; handlers
    registered with :meth:`on_reconnect` run once it is back, before the
    first message after it.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chathub",
        reconnect_max_s: float = 5.0,
        ping_interval_s: float = 10.0,
    ) -> None:
        self._channel_prefix = f"{prefix}:bus:"
        self._url = url
        self._handlers: defaultdict[str, list[Handler]] = defaultdict(list)
        self._reconnect_handlers: list[ReconnectHandler] = []
        self._client: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.subscription = RedisSubscription(
            url,
            patterns=[glob_escape(self._channel_prefix) + "*"],
            on_message=self._on_message,
            on_connect=self._on_connect,
            name=f"{prefix}:bus:{secrets.token_hex(4)}",
            reconnect_max_s=reconnect_max_s,
            ping_interval_s=ping_interval_s,
        )

    def _commands(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_client(self._url)
        return self._client

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        """Retried once on a dropped connection, so a message is lost only
        if Redis stays unreachable; in the rare case where the first try was
        delivered and only its answer lost, it arrives twice (the current
        channels, cancel and dashboard updates, are idempotent)."""
        name = self._channel_prefix + channel
        payload = orjson.dumps(message)
        client = self._commands()
        await retry_once(lambda _: client.publish(name, payload))

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        self._handlers[channel].append(handler)

        def unsubscribe() -> None:
            handlers = self._handlers.get(channel)
            if handlers and handler in handlers:
                handlers.remove(handler)
                if not handlers:
                    del self._handlers[channel]

        return unsubscribe

    def on_reconnect(self, handler: ReconnectHandler) -> Callable[[], None]:
        """Call ``handler()`` each time the subscription comes up after it
        was registered (back after a drop, or up late when Redis was not
        reachable at start), before any message that follows is handed out:
        what was published before never arrived. A sync handler, or the sync
        part of one that returns an awaitable, runs then; the awaitable runs
        as its own task. Returns an idempotent unregister."""
        self._reconnect_handlers.append(handler)

        def unregister() -> None:
            if handler in self._reconnect_handlers:
                self._reconnect_handlers.remove(handler)

        return unregister

    async def _on_connect(self, reconnected: bool) -> None:
        for handler in tuple(self._reconnect_handlers):
            try:
                result = handler()
                if result is not None:
                    self._spawn("reconnect", result)
            except Exception:
                log.exception("bus reconnect handler failed")

    async def _on_message(self, channel: bytes, data: bytes) -> None:
        name = channel.decode()[len(self._channel_prefix) :]
        handlers = tuple(self._handlers.get(name, ()))
        if not handlers:
            return
        for handler in handlers:
            try:
                message = orjson.loads(data)
                result = handler(message)
                if result is not None:
                    self._spawn(name, result)
            except Exception:
                log.exception("bus handler failed on %s", name)

    def _spawn(self, channel: str, awaitable: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("bus handler failed on %s", channel)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await self.subscription.start()

    async def close(self) -> None:
        await self.subscription.close()
        for task in list(self._tasks):
            task.cancel()
        self._handlers.clear()
        self._reconnect_handlers.clear()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ready(self) -> bool:
        return self.subscription.connected and await ping(self._commands())


async def _close_quietly(pubsub: aioredis.client.PubSub) -> None:
    with contextlib.suppress(*CONNECTION_ERRORS):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def ping(client: aioredis.Redis, timeout_s: float = 1.0) -> bool:
    """True when Redis answers a PING within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await retry_once(lambda _: client.ping())
    except CONNECTION_ERRORS:
        return False
    return True
