"""Reply leases: one live reply per session across instances, and exactly
one reaper for the reply of an instance that died.

Instances on Redis are separate RedisReplyLeases objects with a key prefix
of their own per test; in memory they are one object.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from chathub.config import Settings
from chathub.server.leases import (
    MemoryReplyLeases,
    RedisReplyLeases,
    ReplyLeases,
    create_leases,
)
from tests.harness import REDIS_URL
from tests.proxy import RedisProxy
from tests.server.test_session_log_contract import drop_keys

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@dataclass
class Leases:
    backend: str
    prefix: str = field(default_factory=lambda: f"chathub-test-{secrets.token_hex(6)}")
    made: list[ReplyLeases] = field(default_factory=list)

    def make(self, count: int = 1, *, url: str = REDIS_URL) -> list[ReplyLeases]:
        if self.backend == "memory":
            shared = MemoryReplyLeases()
            self.made.append(shared)
            return [shared] * count
        made: list[ReplyLeases] = [RedisReplyLeases(url, prefix=self.prefix) for _ in range(count)]
        self.made.extend(made)
        return made

    async def close(self) -> None:
        for leases in self.made:
            await leases.close()
        if self.backend == "redis":
            await drop_keys(self.prefix)


@pytest.fixture(params=BACKENDS)
async def leases(request: pytest.FixtureRequest) -> AsyncIterator[Leases]:
    made = Leases(request.param)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def redis_leases() -> AsyncIterator[Leases]:
    made = Leases("redis")
    try:
        yield made
    finally:
        await made.close()


def ids() -> tuple[str, str]:
    return f"s-{secrets.token_hex(6)}", f"r-{secrets.token_hex(6)}"


async def test_one_winner_among_concurrent_acquires(leases: Leases) -> None:
    instances = leases.make(3)
    sid, _ = ids()
    attempts = [(f"r-{i}", f"owner-{i % 3}") for i in range(30)]

    won = await asyncio.gather(
        *(
            instances[i % 3].acquire(sid, reply_id, owner, 10)
            for i, (reply_id, owner) in enumerate(attempts)
        )
    )

    assert won.count(True) == 1
    winner = attempts[won.index(True)][0]
    # Only the winner can renew; another session is unaffected.
    assert await instances[1].renew(sid, winner, 10)
    assert not await instances[1].renew(sid, "r-not-the-winner", 10)
    other_sid, other_reply = ids()
    assert await instances[2].acquire(other_sid, other_reply, "owner-2", 10)


async def test_renew_and_release_only_by_the_holder(leases: Leases) -> None:
    a, b = leases.make(2)
    sid, reply = ids()
    assert not await b.held(sid)
    assert await a.acquire(sid, reply, "owner-a", 10)
    assert await b.held(sid)  # seen from every instance

    assert await a.renew(sid, reply, 10)
    assert not await b.renew(sid, "r-other", 10)
    await b.release(sid, "r-other")  # not the holder: no effect
    assert not await b.acquire(sid, "r-other", "owner-b", 10)
    assert await b.renew(sid, reply, 10)  # the lease is the reply's, not the object's

    await a.release(sid, reply)
    await a.release(sid, reply)  # idempotent
    assert not await b.held(sid)
    assert not await a.renew(sid, reply, 10)
    assert await b.acquire(sid, "r-next", "owner-b", 10)


async def test_acquire_again_by_the_holder_is_idempotent(leases: Leases) -> None:
    (store,) = leases.make()
    sid, reply = ids()
    assert await store.acquire(sid, reply, "owner-a", 10)
    if leases.backend == "redis":
        # A retried acquire (its first answer lost) must not report defeat.
        assert await store.acquire(sid, reply, "owner-a", 10)
    assert not await store.acquire(sid, reply, "owner-b", 10)


async def test_a_lapsed_lease_cannot_be_renewed_and_frees_the_session(leases: Leases) -> None:
    a, b = leases.make(2)
    sid, reply = ids()
    assert await a.acquire(sid, reply, "owner-a", 0.2)
    await asyncio.sleep(0.35)

    assert not await a.held(sid)
    assert not await a.renew(sid, reply, 10)
    assert await b.acquire(sid, "r-next", "owner-b", 10)


async def test_memory_never_reports_a_local_reply_as_expired() -> None:
    store = MemoryReplyLeases()
    sid, reply = ids()
    assert await store.acquire(sid, reply, "me", 0.05)
    await asyncio.sleep(0.1)
    assert await store.expired() == []
    assert await store.expired(time.time() + 3600) == []
    assert not await store.claim_expired(reply)


@pytest.mark.redis
async def test_the_reply_of_a_dead_owner_is_claimed_exactly_once(redis_leases: Leases) -> None:
    dead, *reapers = redis_leases.make(4)
    sid, reply = ids()
    live_sid, live_reply = ids()
    assert await dead.acquire(sid, reply, "owner-dead", 0.2)
    assert await reapers[0].acquire(live_sid, live_reply, "owner-live", 30)
    assert await reapers[0].expired() == []

    await asyncio.sleep(0.35)  # the owner stopped renewing

    for reaper in reapers:
        lapsed = await reaper.expired()
        assert [(r.reply_id, r.session_id, r.owner_id) for r in lapsed] == [
            (reply, sid, "owner-dead")
        ]
        assert lapsed[0].expired_at <= time.time() + 1
    claims = await asyncio.gather(*(reaper.claim_expired(reply) for reaper in reapers * 3))
    assert claims.count(True) == 1
    assert await reapers[1].expired() == []
    assert not await reapers[2].claim_expired(reply)
    # The owner comes back too late: its lease is gone.
    assert not await dead.renew(sid, reply, 10)
    await dead.release(sid, reply)


@pytest.mark.redis
async def test_a_live_reply_cannot_be_claimed_even_by_a_fast_clock(redis_leases: Leases) -> None:
    owner, reaper = redis_leases.make(2)
    sid, reply = ids()
    assert await owner.acquire(sid, reply, "owner-a", 30)

    # A reaper whose clock runs an hour ahead sees it as lapsed...
    assert [r.reply_id for r in await reaper.expired(time.time() + 3600)] == [reply]
    # ...but claiming checks the lease itself, on Redis' clock.
    assert not await reaper.claim_expired(reply)
    assert await owner.renew(sid, reply, 30)


@pytest.mark.redis
async def test_renewal_keeps_a_reply_off_the_expired_list(redis_leases: Leases) -> None:
    owner, reaper = redis_leases.make(2)
    sid, reply = ids()
    assert await owner.acquire(sid, reply, "owner-a", 0.3)
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert await owner.renew(sid, reply, 0.3)
        assert reply not in [r.reply_id for r in await reaper.expired()]
        assert not await reaper.claim_expired(reply)
    await owner.release(sid, reply)
    await asyncio.sleep(0.4)
    assert reply not in [r.reply_id for r in await reaper.expired()]


@pytest.mark.redis
async def test_a_claim_whose_answer_was_lost_still_wins(redis_leases: Leases) -> None:
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    try:
        owner, other = redis_leases.make(2)
        (reaper,) = redis_leases.make(url=proxy.url)
        sid, reply = ids()
        warm_sid, warm_reply = ids()
        assert await owner.acquire(sid, reply, "owner-dead", 0.1)
        assert await owner.acquire(warm_sid, warm_reply, "owner-dead", 0.1)
        await asyncio.sleep(0.25)
        # Claiming once loads the script into Redis, so the next claim is
        # exactly two requests: the info lookup, then the script.
        assert await other.claim_expired(warm_reply)
        assert [r.reply_id for r in await reaper.expired()] == [reply]

        proxy.drop_next_reply(skip=1)  # the script runs; its answer is lost
        assert await reaper.claim_expired(reply)
        assert not await other.claim_expired(reply)
        assert await reaper.expired() == []
    finally:
        await proxy.stop()


@pytest.mark.redis
async def test_create_leases_follows_the_redis_url() -> None:
    memory = create_leases(Settings(redis_url=None))
    assert isinstance(memory, MemoryReplyLeases)
    redis = create_leases(Settings(redis_url=REDIS_URL))
    try:
        assert isinstance(redis, RedisReplyLeases)
        assert await redis.ready()
    finally:
        await redis.close()
