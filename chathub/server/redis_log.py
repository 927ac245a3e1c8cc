"""The session log in Redis: one Stream per session, fan-out by pub/sub.

Keys (``{…}`` are literal Redis Cluster hash tags, so both keys of a session
live on one shard and one script can touch them)::

    <prefix>:seq:{<session_id>}   the session's counter: the last seq given
    <prefix>:log:{<session_id>}   Stream of the recent events, entry id 0-<seq>,
                                  fields t (type) and f (the frame)
    <prefix>:reply:{<session_id>} the session's current reply (the fence): only
                                  it may append deltas and steps
    <prefix>:events               pub/sub channel: every appended event

One Lua script does an append atomically: INCR the counter, XADD the frame
under id ``0-<seq>`` (trimmed to about ``max_length``), refresh both TTLs and
PUBLISH ``<seq>\\n<type>\\n<session_id>\\n<frame>``. Scripts run one at a
time, so publish order is seq order. The frame is spliced from two byte
strings encoded here (``{"type":…,"session_id":…,"seq":`` and ``,<data>}``)
around the seq, which makes it byte-for-byte what :meth:`Event.build` gives.

Past one Redis, :class:`ShardedSessionLog` spreads sessions over several
(``CHATHUB_REDIS_LOG_SHARDS``): each session's keys live on the shard its id
hashes to, each shard publishes on a channel of its own
(``<prefix>:events:<shard>``), and every instance reads them all. A key
``<prefix>:log-shard`` on each shard holds ``<index>/<count>`` as the first
instance to start set it; an instance that sees the list otherwise refuses to
start, since instances that place a session on different shards would give
out its seqs twice.

Every instance reads the channel on one connection and calls its listeners
with each event, per session in seq order, each event once. After a pub/sub
reconnection, and whenever an event arrives with a gap before it, the events
missed are read back from the streams of the sessions this instance has seen
(sessions it delivered events of, or was asked ``last_seq`` of, that is,
sessions a socket joined here), so a lost last event is recovered too.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from redis.exceptions import RedisError, ResponseError

from chathub.config import ConfigError
from chathub.server import metrics
from chathub.server.redis_bus import RedisSubscription, ping, redis_client, retry_once
from chathub.server.session_log import Event, Listener, LogUnavailable, StaleReply, reply_fence
from chathub.storage.db import while_unreachable

log = logging.getLogger("chathub.log")

# KEYS: stream, counter, reply fence. ARGV: head, tail, type, session_id,
# max_length, stream ttl ms, counter ttl ms, channel, floor (the highest seq
# this instance knows of, so a counter lost by Redis never goes back),
# token, retry, fence action, reply id. The token is kept in the entry
# (field k): a retry after a dropped connection returns the seq of the first
# try if that one went through. The fence holds the session's current reply
# (``reply_fence``): ``start`` sets it, ``end`` retires it (if it is still
# that reply), and a ``check`` event of any other reply is refused.
APPEND = """
if ARGV[12] == 'check' then
  local current = redis.call('GET', KEYS[3])
  if current and current ~= ARGV[13] then
    return redis.error_reply('STALE reply ' .. ARGV[13])
  end
end
if ARGV[11] == '1' then
  local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 500)
  for _, entry in ipairs(recent) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'k' and fields[i + 1] == ARGV[10] then
        return tonumber(string.match(entry[1], '^0%-(%d+)$'))
      end
    end
  end
end
local seq = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[9])
if seq == 1 then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if top[1] then
    local held = tonumber(string.match(top[1][1], '^0%-(%d+)$'))
    if held and held > floor then floor = held end
  end
end
local lifted = seq <= floor
if lifted then seq = floor + 1 end
local id = string.format('%d', seq)
if lifted then redis.call('SET', KEYS[2], id) end
local frame = ARGV[1] .. id .. ARGV[2]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '0-' .. id,
  't', ARGV[3], 'f', frame, 'k', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
if ARGV[12] == 'start' then
  redis.call('SET', KEYS[3], ARGV[13], 'PX', ARGV[7])
elseif ARGV[12] == 'end' and redis.call('GET', KEYS[3]) == ARGV[13] then
  redis.call('SET', KEYS[3], '-' .. ARGV[13], 'PX', ARGV[7])
end
redis.call('PUBLISH', ARGV[8], id .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. frame)
return seq
"""

# KEYS: counter. ARGV: seq, counter ttl ms.
ENSURE_FLOOR = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"""

RESERVED = frozenset({"type", "session_id", "seq"})
REPAIR_BATCH = 200
DEFAULT_SEQ_TTL_S = 30 * 86_400


class RedisSessionLog:
    """:class:`~chathub.server.session_log.SessionLog` on Redis Streams.

    ``append`` returns once the event is stored; local listeners receive it a
    moment later, from the channel. ``seq_ttl_s`` (at least ``ttl_s``) keeps
    a session's counter after its window expired, so ``last_seq`` stays right
    and ``read_after`` reports the loss (``None``) instead of ``[]``.
    """

    def __init__(
        self,
        url: str,
        *,
        max_length: int = 10_000,
        ttl_s: float = 86_400,
        seq_ttl_s: float | None = None,
        prefix: str = "chathub",
        reconnect_max_s: float = 5.0,
        ping_interval_s: float = 10.0,
        max_tracked_sessions: int = 100_000,
        shard: tuple[int, int] | None = None,
        append_patience_s: float = 30.0,
    ) -> None:
        """``shard``: (index, count) when this log is one shard of a
        :class:`ShardedSessionLog`. ``append_patience_s``: how long an
        append waits for an unreachable Redis before it gives up."""
        self.append_patience_s = append_patience_s
        self.max_length = max(1, max_length)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.seq_ttl_ms = max(self.ttl_ms, int((seq_ttl_s or DEFAULT_SEQ_TTL_S) * 1000))
        self.prefix = prefix
        self.shard = shard
        self.channel = f"{prefix}:events" if shard is None else f"{prefix}:events:{shard[0]}"
        self._url = url
        self._client = redis_client(url)
        self._append = self._client.register_script(APPEND)
        self._ensure_floor = self._client.register_script(ENSURE_FLOOR)
        self._listeners: list[Listener] = []
        # session -> last seq handed to the listeners (LRU, bounded).
        self._delivered: OrderedDict[str, int] = OrderedDict()
        # session -> highest seq this instance appended (the append floor).
        self._appended: OrderedDict[str, int] = OrderedDict()
        self._max_tracked = max_tracked_sessions
        self.subscription = RedisSubscription(
            url,
            channels=[self.channel],
            on_message=self._on_message,
            on_connect=self._on_connect,
            name=f"{prefix}:log:{secrets.token_hex(4)}",
            reconnect_max_s=reconnect_max_s,
            ping_interval_s=ping_interval_s,
            role="log",
        )

    # -- keys --------------------------------------------------------------

    def stream_key(self, session_id: str) -> str:
        return f"{self.prefix}:log:{{{session_id}}}"

    def seq_key(self, session_id: str) -> str:
        return f"{self.prefix}:seq:{{{session_id}}}"

    def fence_key(self, session_id: str) -> str:
        return f"{self.prefix}:reply:{{{session_id}}}"

    # -- SessionLog --------------------------------------------------------

    async def append(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        if "\n" in session_id or "\n" in type:
            raise ValueError("session ids and event types cannot contain a newline")
        clash = RESERVED.intersection(data)
        if clash:
            raise ValueError(f"event data cannot set {sorted(clash)}")
        head = orjson.dumps({"type": type, "session_id": session_id})[:-1] + b',"seq":'
        body = orjson.dumps(data)
        tail = b"}" if body == b"{}" else b"," + body[1:]
        floor = max(self._appended.get(session_id, 0), self._delivered.get(session_id, 0))
        keys = [self.stream_key(session_id), self.seq_key(session_id), self.fence_key(session_id)]
        fence, reply_id = reply_fence(type, data) or ("", "")
        args: list[bytes | str | int] = [
            head,
            tail,
            type,
            session_id,
            self.max_length,
            self.ttl_ms,
            self.seq_ttl_ms,
            self.channel,
            floor,
            secrets.token_bytes(8),
        ]
        seq = await self._append_patiently(session_id, type, keys, args, fence, reply_id)
        _remember(self._appended, session_id, seq, self._max_tracked)
        return Event.of(session_id, seq, type, (head + str(seq).encode() + tail).decode())

    async def _append_patiently(
        self,
        session_id: str,
        type: str,
        keys: list[str],
        args: list[bytes | str | int],
        fence: str,
        reply_id: str,
    ) -> int:
        """Run the append script until Redis answers, for up to
        ``append_patience_s``. A connection dropped or timed out after
        sending may still have appended (or append once Redis wakes from a
        stall): every try after the first says so, and the script returns
        the seq of the first one that went through, found by its token."""

        def retrying(exc: BaseException) -> None:
            metrics.LOG_APPEND_RETRIES.inc()
            log.warning("append of %s to %s failed (%r); trying again", type, session_id, exc)

        try:
            return int(
                await while_unreachable(
                    lambda again: self._append(
                        keys=keys, args=[*args, int(again), fence, reply_id]
                    ),
                    for_s=self.append_patience_s,
                    on_retry=retrying,
                )
            )
        except ResponseError as exc:
            if str(exc).startswith("STALE"):
                raise StaleReply(f"reply {reply_id} no longer holds session {session_id}") from exc
            raise
        except (RedisError, OSError) as exc:
            metrics.LOG_APPENDS_FAILED.inc()
            raise LogUnavailable(f"the session log could not take {type}: {exc}") from exc

    async def read_after(self, session_id: str, after_seq: int) -> list[Event] | None:
        after_seq = max(0, after_seq)

        async def read(_: bool) -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(self.seq_key(session_id))
                pipe.xrange(self.stream_key(session_id), min=f"0-{after_seq + 1}")
                return await pipe.execute()

        raw_last, entries = await retry_once(read)
        last = int(raw_last or 0)
        if after_seq > last:
            return None
        if after_seq == last:
            return []
        events = _events(session_id, entries)
        expected = after_seq + 1
        for event in events:
            if event.seq != expected:
                return None  # trimmed, expired, or skipped by a floor
            expected += 1
        if not events:
            return None
        return events

    async def held(self, session_id: str) -> list[Event]:
        return await self._read_range(session_id, 0)

    async def last_seq(self, session_id: str) -> int:
        key = self.seq_key(session_id)
        last = int(await retry_once(lambda _: self._client.get(key)) or 0)
        # A socket is joining at ``last``: watch the session from there, so
        # events missed during a reconnection can be read back for it.
        if session_id not in self._delivered:
            _remember(self._delivered, session_id, last, self._max_tracked)
        return last

    async def ensure_floor(self, session_id: str, seq: int) -> None:
        keys = [self.seq_key(session_id)]
        await retry_once(lambda _: self._ensure_floor(keys=keys, args=[seq, self.seq_ttl_ms]))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        if self.shard is not None:
            await self._claim_shard(*self.shard)
        await self.subscription.start()

    async def _claim_shard(self, index: int, count: int) -> None:
        """Mark this Redis as shard ``index`` of ``count``, or check that it
        is marked so (ConfigError if not)."""
        key, mark = f"{self.prefix}:log-shard", f"{index}/{count}"
        await retry_once(lambda _: self._client.set(key, mark, nx=True))
        raw = await retry_once(lambda _: self._client.get(key))
        found = "" if raw is None else _text(raw)
        if found != mark:
            raise ConfigError(
                f"the session log shard {_where(self._url)} is shard {found} to other instances, "
                f"but {mark} here: every instance must list the same "
                "CHATHUB_REDIS_LOG_SHARDS in the same order (to change the list, stop "
                f"every instance and delete the key {key!r} on each shard)"
            )

    async def close(self) -> None:
        await self.subscription.close()
        await self._client.aclose()
        self._delivered.clear()
        self._appended.clear()

    async def ready(self) -> bool:
        return self.subscription.connected and await ping(self._client)

    # -- delivery ----------------------------------------------------------

    async def _on_message(self, channel: bytes, data: bytes) -> None:
        raw_seq, raw_type, raw_session, frame = data.split(b"\n", 3)
        event = Event(raw_session.decode(), int(raw_seq), raw_type.decode(), frame.decode())
        delivered = self._delivered.get(event.session_id)
        if delivered is not None and event.seq > delivered + 1:
            missed = await self._read_range(event.session_id, delivered)
            if missed and missed[0].seq == delivered + 1:
                for earlier in missed:
                    self._deliver(earlier)
        self._deliver(event)

    async def _on_connect(self, reconnected: bool) -> None:
        """After a reconnection, read back what the channel lost meanwhile."""
        if not reconnected or not self._delivered:
            return
        watched = list(self._delivered.items())
        for start in range(0, len(watched), REPAIR_BATCH):
            batch = watched[start : start + REPAIR_BATCH]

            async def read(_: bool, batch: list[tuple[str, int]] = batch) -> list[Any]:
                async with self._client.pipeline(transaction=False) as pipe:
                    for session_id, seq in batch:
                        pipe.xrange(self.stream_key(session_id), min=f"0-{seq + 1}")
                    return await pipe.execute()

            results = await retry_once(read)
            for (session_id, _), entries in zip(batch, results, strict=True):
                for event in _events(session_id, entries):
                    self._deliver(event)

    async def _read_range(self, session_id: str, after_seq: int) -> list[Event]:
        key = self.stream_key(session_id)
        entries = await retry_once(lambda _: self._client.xrange(key, min=f"0-{after_seq + 1}"))
        return _events(session_id, entries)

    def _deliver(self, event: Event) -> None:
        """Hand ``event`` to the listeners unless they already had it."""
        delivered = self._delivered.get(event.session_id)
        if delivered is not None and event.seq <= delivered:
            return
        _remember(self._delivered, event.session_id, event.seq, self._max_tracked)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("session log listener failed")


class ShardedSessionLog:
    """:class:`~chathub.server.session_log.SessionLog` over several Redis
    servers: one :class:`RedisSessionLog` per shard, each session on the
    shard its id hashes to (CRC-32, so every process agrees). A session's
    events all come from its shard, so they reach the listeners in seq order
    as with one Redis."""

    def __init__(self, urls: Sequence[str], **options: Any) -> None:
        if not urls:
            raise ValueError("a sharded log needs at least one Redis URL")
        count = len(urls)
        self.shards = [
            RedisSessionLog(url, shard=(index, count), **options) for index, url in enumerate(urls)
        ]

    def shard_of(self, session_id: str) -> RedisSessionLog:
        return self.shards[zlib.crc32(session_id.encode()) % len(self.shards)]

    async def append(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        return await self.shard_of(session_id).append(session_id, type, data)

    async def read_after(self, session_id: str, after_seq: int) -> list[Event] | None:
        return await self.shard_of(session_id).read_after(session_id, after_seq)

    async def held(self, session_id: str) -> list[Event]:
        return await self.shard_of(session_id).held(session_id)

    async def last_seq(self, session_id: str) -> int:
        return await self.shard_of(session_id).last_seq(session_id)

    async def ensure_floor(self, session_id: str, seq: int) -> None:
        await self.shard_of(session_id).ensure_floor(session_id, seq)

    def add_listener(self, listener: Listener) -> None:
        for shard in self.shards:
            shard.add_listener(listener)

    async def start(self) -> None:
        try:
            for shard in self.shards:
                await shard.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(shard.close() for shard in self.shards), return_exceptions=True)

    async def ready(self) -> bool:
        return all(await asyncio.gather(*(shard.ready() for shard in self.shards)))


def _where(url: str) -> str:
    """A Redis URL without its credentials, for messages."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _events(session_id: str, entries: Any) -> list[Event]:
    events = []
    for entry_id, fields in entries or ():
        seq = int(_text(entry_id).partition("-")[2])
        values = cast(dict[bytes, bytes], fields)
        events.append(Event(session_id, seq, _text(values[b"t"]), _text(values[b"f"])))
    return events


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _remember(table: OrderedDict[str, int], session_id: str, seq: int, limit: int) -> None:
    table[session_id] = seq
    table.move_to_end(session_id)
    while len(table) > limit:
        table.popitem(last=False)
