"""Rate limits: the generic cell rate algorithm (GCRA), a token bucket kept as
one timestamp per key. In process on the embedded default; in Redis (one Lua
script, atomic) when several instances must share the limit.

``limit`` units per ``period_s`` seconds, with bursts up to ``limit``. A call
costs ``cost`` units; it is refused, with the seconds to wait, when the bucket
cannot hold it. A refused call costs nothing. ``charge`` records a cost known
only afterwards (the tokens a reply used) even past the limit: the bucket
owes it, and the next calls wait until it is paid back; a negative cost
gives back what a call took.

:func:`take` and :func:`owe` apply the settings' per-minute limits to a
request: a member's and a team's buckets at once, refused as ``RateLimited``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from chathub.config import Settings
from chathub.errors import RateLimited
from chathub.server.redis_bus import redis_client, retry_once


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


class RateLimiter(Protocol):
    async def hit(self, key: str, *, cost: float, limit: float, period_s: float) -> Decision: ...

    async def charge(self, key: str, *, cost: float, limit: float, period_s: float) -> None: ...

    async def close(self) -> None: ...


def _gcra(
    tat: float, now: float, cost: float, limit: float, period_s: float, *, force: bool = False
) -> tuple[bool, float, float]:
    """(allowed, new tat, retry after) for one request; pure. ``force``:
    take the cost even when it does not fit."""
    interval = period_s / limit  # seconds per unit
    burst = period_s  # the whole limit may be spent at once
    tat = max(tat, now)
    new_tat = tat + cost * interval
    allow_at = new_tat - burst
    if allow_at <= now or force:
        return True, new_tat, 0.0
    return False, tat, allow_at - now


class MemoryRateLimiter:
    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    async def hit(self, key: str, *, cost: float, limit: float, period_s: float) -> Decision:
        return self._take(key, cost, limit, period_s, force=False)

    async def charge(self, key: str, *, cost: float, limit: float, period_s: float) -> None:
        self._take(key, cost, limit, period_s, force=True)

    def _take(
        self, key: str, cost: float, limit: float, period_s: float, *, force: bool
    ) -> Decision:
        now = time.monotonic()
        allowed, tat, wait = _gcra(self._tat.get(key, now), now, cost, limit, period_s, force=force)
        if allowed:
            self._tat[key] = tat
            if len(self._tat) > 100_000:  # forget buckets that are full again
                self._tat = {k: v for k, v in self._tat.items() if v > now}
        return Decision(allowed, wait)

    async def close(self) -> None:
        self._tat.clear()


_LUA = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local force = ARGV[5] == '1'
local interval = period / limit
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = new_tat - period
if allow_at <= now or force then
  local ttl = math.max(1, math.ceil((new_tat - now) * 1000) + 1000)
  redis.call('SET', key, new_tat, 'PX', ttl)
  return {1, '0'}
end
return {0, tostring(allow_at - now)}
"""


class RedisRateLimiter:
    """Shared limits: every instance reads and writes the same bucket, in one
    atomic script, against Redis's clock (so instances' clocks don't matter)."""

    def __init__(
        self, url: str, *, prefix: str = "chathub:rate:", name: str = "chathub-rate"
    ) -> None:
        self._redis: Redis = redis_client(url, name=name)
        self._script = self._redis.register_script(_LUA)
        self.prefix = prefix

    async def hit(self, key: str, *, cost: float, limit: float, period_s: float) -> Decision:
        return await self._take(key, cost, limit, period_s, force=False)

    async def charge(self, key: str, *, cost: float, limit: float, period_s: float) -> None:
        await self._take(key, cost, limit, period_s, force=True)

    async def _take(
        self, key: str, cost: float, limit: float, period_s: float, *, force: bool
    ) -> Decision:
        # Tried again once on a dropped connection (a pooled connection Redis
        # closed in a restart), as every Redis path is. Should the first try's
        # script have run before its reply was lost, the bucket is charged
        # twice: the client waits a little longer, no limit is exceeded.
        async def take(_again: bool) -> list[Any]:
            seconds, micros = await self._redis.time()
            now = seconds + micros / 1_000_000
            args = [repr(now), repr(cost), repr(limit), repr(period_s), "1" if force else "0"]
            result: list[Any] = await self._script(keys=[self.prefix + key], args=args)
            return result

        allowed, wait = await retry_once(take)
        return Decision(bool(allowed), float(wait))

    async def close(self) -> None:
        await self._redis.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url)
    return MemoryRateLimiter()


def retry_after(decisions: list[Decision]) -> float | None:
    waits = [d.retry_after_s for d in decisions if not d.allowed]
    return math.ceil(max(waits) * 1000) / 1000 if waits else None


PER_MINUTE_S = 60.0
"""The period of the settings' limits (``CHATHUB_RATE_*``): per minute."""

Bucket = tuple[str, str, float, int]
"""(what it counts, key, cost, limit per minute); a limit of 0 is off."""
Taken = list[tuple[str, float, int]]
"""What :func:`take` took: (key, cost, limit) per bucket."""


async def take(limiter: RateLimiter, buckets: Iterable[Bucket]) -> Taken:
    """Take each bucket's cost, from all of them or from none: when one
    cannot hold its cost, what the others took is given back and
    ``RateLimited`` is raised with the longest wait, naming what is over.
    At most a whole limit is taken from a bucket, so that one request larger
    than the limit passes when the bucket is full rather than never."""
    taken: Taken = []
    decisions: list[Decision] = []
    refused: list[str] = []
    for what, key, cost, limit in buckets:
        if limit > 0:
            share = min(cost, limit)
            decision = await limiter.hit(key, cost=share, limit=limit, period_s=PER_MINUTE_S)
            decisions.append(decision)
            if decision.allowed:
                taken.append((key, share, limit))
            elif what not in refused:
                refused.append(what)
    wait = retry_after(decisions)
    if wait is not None:
        await give_back(limiter, taken)
        raise RateLimited(
            f"too many {' and '.join(refused)} this minute; try again later", retry_after_s=wait
        )
    return taken


async def give_back(limiter: RateLimiter, taken: Taken) -> None:
    """Return what :func:`take` took (its request was not carried out)."""
    for key, cost, limit in taken:
        await limiter.charge(key, cost=-cost, limit=limit, period_s=PER_MINUTE_S)


async def owe(limiter: RateLimiter, buckets: Iterable[tuple[str, int]], cost: float) -> None:
    """Charge ``cost``, known only afterwards, to every (key, limit) bucket
    even past its limit: the next requests wait until it is paid back."""
    for key, limit in buckets:
        if limit > 0:
            await limiter.charge(key, cost=cost, limit=limit, period_s=PER_MINUTE_S)
