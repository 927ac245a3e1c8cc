"""Reply leases: at most one live reply per session across all instances,
and a way for a live instance to end the replies of a dead one.

The instance generating a reply holds the session's lease and renews it while
the reply runs. Every lease is also listed in a registry with its expiry, so
that when an owner dies (stops renewing), any instance can see the reply in
``expired()`` and end it; ``claim_expired`` makes sure exactly one does.

Redis keys (``{…}`` is a literal hash tag)::

    <prefix>:lease:session:{<session_id>}  "<reply_id>\\n<owner_id>", PX ttl
    <prefix>:replies                       sorted set: reply_id -> expiry (ms)
    <prefix>:replies:info                  hash: reply_id -> JSON {session_id, owner_id}
    <prefix>:claim:{<reply_id>}            the winning claim's token, for 60 s

Every call is retried once after a dropped connection, and each script is
safe to run twice: acquire recognises its own lease, claim its own token.

Expiry times come from the Redis server clock (``TIME`` in the scripts), so
instances with skewed clocks agree on who has lapsed.

:class:`MemoryReplyLeases` serves the embedded default: one process owns
every reply, and a reply only dies with that process (and its memory), so
``expired()`` is always empty there.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Protocol, cast

import orjson

from chathub.config import Settings
from chathub.server.redis_bus import ping, redis_client, retry_once


@dataclass(frozen=True, slots=True)
class ExpiredReply:
    reply_id: str
    session_id: str
    owner_id: str
    expired_at: float  # epoch seconds


class ReplyLeases(Protocol):
    async def acquire(self, session_id: str, reply_id: str, owner_id: str, ttl_s: float) -> bool:
        """Take the session's lease for ``reply_id``; False when another
        reply of the session holds a live lease."""
        ...

    async def renew(self, session_id: str, reply_id: str, ttl_s: float) -> bool:
        """Extend the lease if ``reply_id`` still holds it; False means it was
        lost (it lapsed, was claimed, or another reply took the session) and
        the reply should stop."""
        ...

    async def release(self, session_id: str, reply_id: str) -> None:
        """Drop the lease (if ``reply_id`` holds it) and the registry entry.
        Idempotent. To learn whether a reaper took the reply over, ``renew``
        before finishing: False means it did (or may)."""
        ...

    async def held(self, session_id: str) -> bool:
        """Whether some reply holds the session's lease now."""
        ...

    async def expired(self, now: float | None = None) -> list[ExpiredReply]:
        """Up to 100 registered replies whose lease lapsed at or before
        ``now`` (epoch seconds; default: the store's clock), oldest first."""
        ...

    async def claim_expired(self, reply_id: str) -> bool:
        """Take an expired reply off the registry so that the caller ends it.
        Exactly one caller gets True; a reply renewed meanwhile gives False."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...


@dataclass
class _Lease:
    reply_id: str
    owner_id: str
    expires_at: float


class MemoryReplyLeases:
    """One process: leases in a dict, on the monotonic clock."""

    def __init__(self) -> None:
        self._by_session: dict[str, _Lease] = {}

    def _live(self, session_id: str) -> _Lease | None:
        lease = self._by_session.get(session_id)
        if lease is not None and lease.expires_at <= time.monotonic():
            return None
        return lease

    async def acquire(self, session_id: str, reply_id: str, owner_id: str, ttl_s: float) -> bool:
        lease = self._live(session_id)
        if lease is not None:
            return False
        self._by_session[session_id] = _Lease(reply_id, owner_id, time.monotonic() + ttl_s)
        return True

    async def renew(self, session_id: str, reply_id: str, ttl_s: float) -> bool:
        lease = self._live(session_id)
        if lease is None or lease.reply_id != reply_id:
            return False
        lease.expires_at = time.monotonic() + ttl_s
        return True

    async def release(self, session_id: str, reply_id: str) -> None:
        lease = self._by_session.get(session_id)
        if lease is not None and lease.reply_id == reply_id:
            del self._by_session[session_id]

    async def held(self, session_id: str) -> bool:
        return self._live(session_id) is not None

    async def expired(self, now: float | None = None) -> list[ExpiredReply]:
        return []

    async def claim_expired(self, reply_id: str) -> bool:
        return False

    async def close(self) -> None:
        self._by_session.clear()

    async def ready(self) -> bool:
        return True


_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease, registry, info. ARGV: reply_id, owner_id, ttl ms, info JSON.
ACQUIRE = (
    _NOW_MS
    + """
local value = ARGV[1] .. '\\n' .. ARGV[2]
if not redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[3]) then
  -- Ours already: this is a retry of an acquire that went through.
  if redis.call('GET', KEYS[1]) == value then return 1 end
  return 0
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""
)

_OURS = """
local held = redis.call('GET', KEYS[1])
local ours = held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. '\\n'
"""

# KEYS: lease, registry. ARGV: reply_id, ttl ms.
RENEW = (
    _NOW_MS
    + _OURS
    + """
if not ours or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: lease, registry, info. ARGV: reply_id.
RELEASE = (
    _OURS
    + """
if ours then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 0
"""
)

# KEYS: registry, info, lease (of the reply's session), claim marker.
# ARGV: reply_id, token, retry. The marker lets a retry after a dropped
# connection see that its first try won.
CLAIM = (
    _NOW_MS
    + """
if ARGV[3] == '1' and redis.call('GET', KEYS[4]) == ARGV[2] then return 1 end
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) > now then return 0 end
local held = redis.call('GET', KEYS[3])
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. '\\n' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2], 'PX', 60000)
return 1
"""
)

EXPIRED_BATCH = 100


class RedisReplyLeases:
    """Leases and the reply registry in Redis (see the module docstring)."""

    def __init__(self, url: str, *, prefix: str = "chathub") -> None:
        self.prefix = prefix
        self.registry_key = f"{prefix}:replies"
        self.info_key = f"{prefix}:replies:info"
        self._client = redis_client(url)
        self._acquire = self._client.register_script(ACQUIRE)
        self._renew = self._client.register_script(RENEW)
        self._release = self._client.register_script(RELEASE)
        self._claim = self._client.register_script(CLAIM)

    def lease_key(self, session_id: str) -> str:
        return f"{self.prefix}:lease:session:{{{session_id}}}"

    async def acquire(self, session_id: str, reply_id: str, owner_id: str, ttl_s: float) -> bool:
        keys = [self.lease_key(session_id), self.registry_key, self.info_key]
        info = orjson.dumps({"session_id": session_id, "owner_id": owner_id})
        args: list[bytes | str | int] = [reply_id, owner_id, _ms(ttl_s), info]
        return bool(await retry_once(lambda _: self._acquire(keys=keys, args=args)))

    async def renew(self, session_id: str, reply_id: str, ttl_s: float) -> bool:
        keys = [self.lease_key(session_id), self.registry_key]
        args: list[str | int] = [reply_id, _ms(ttl_s)]
        return bool(await retry_once(lambda _: self._renew(keys=keys, args=args)))

    async def release(self, session_id: str, reply_id: str) -> None:
        keys = [self.lease_key(session_id), self.registry_key, self.info_key]
        await retry_once(lambda _: self._release(keys=keys, args=[reply_id]))

    async def held(self, session_id: str) -> bool:
        key = self.lease_key(session_id)
        return bool(await retry_once(lambda _: self._client.exists(key)))

    async def expired(self, now: float | None = None) -> list[ExpiredReply]:
        client = self._client
        if now is None:
            seconds, micros = await retry_once(lambda _: client.time())
            now_ms = int(seconds) * 1000 + int(micros) // 1000
        else:
            now_ms = int(now * 1000)
        lapsed = cast(
            list[tuple[bytes, float]],
            await retry_once(
                lambda _: client.zrangebyscore(
                    self.registry_key, "-inf", now_ms, start=0, num=EXPIRED_BATCH, withscores=True
                )
            ),
        )
        if not lapsed:
            return []
        ids = [_text(reply_id) for reply_id, _ in lapsed]
        infos = await retry_once(lambda _: client.hmget(self.info_key, ids))
        replies = []
        for (reply_id, score), raw in zip(lapsed, infos, strict=True):
            info = orjson.loads(raw) if raw else {}
            replies.append(
                ExpiredReply(
                    reply_id=_text(reply_id),
                    session_id=str(info.get("session_id", "")),
                    owner_id=str(info.get("owner_id", "")),
                    expired_at=float(score) / 1000,
                )
            )
        return replies

    async def claim_expired(self, reply_id: str) -> bool:
        raw = await retry_once(lambda _: self._client.hget(self.info_key, reply_id))
        if raw is None:
            return False  # released, or claimed already
        session_id = str(orjson.loads(raw).get("session_id", ""))
        keys = [
            self.registry_key,
            self.info_key,
            self.lease_key(session_id),
            f"{self.prefix}:claim:{{{reply_id}}}",
        ]
        token = secrets.token_hex(8)
        return bool(
            await retry_once(
                lambda again: self._claim(keys=keys, args=[reply_id, token, int(again)])
            )
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def ready(self) -> bool:
        return await ping(self._client)


def create_leases(settings: Settings) -> ReplyLeases:
    """``CHATHUB_REDIS_URL`` set: leases in Redis; otherwise in-process."""
    if settings.redis_url:
        return RedisReplyLeases(settings.redis_url)
    return MemoryReplyLeases()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
