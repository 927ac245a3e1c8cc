"""Rate limits: the limiter on its own (in process and in Redis, where
instances share the bucket) and as clients meet it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from chathub.server.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tests.harness import REDIS_URL, make_team, start_server, test_settings
from tests.wsclient import WsClient


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    made: RateLimiter = (
        MemoryRateLimiter() if request.param == "memory" else RedisRateLimiter(REDIS_URL)
    )
    try:
        yield made
    finally:
        await made.close()


async def test_burst_then_refusal_with_retry_after(limiter: RateLimiter) -> None:
    key = secrets.token_hex(8)
    results = [await limiter.hit(key, cost=1, limit=5, period_s=60) for _ in range(7)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 2
    assert 0 < results[-1].retry_after_s <= 12.5  # one unit comes back every 12 s
    # costs count: a big request spends the bucket
    other = secrets.token_hex(8)
    assert (await limiter.hit(other, cost=4, limit=5, period_s=60)).allowed
    assert not (await limiter.hit(other, cost=2, limit=5, period_s=60)).allowed
    assert (await limiter.hit(other, cost=1, limit=5, period_s=60)).allowed


async def test_a_charge_is_owed_past_the_limit_and_paid_back_over_time(
    limiter: RateLimiter,
) -> None:
    key = f"charge-{secrets.token_hex(4)}"
    await limiter.charge(key, cost=15, limit=10, period_s=1)  # 1.5 periods' worth
    refused = await limiter.hit(key, cost=1, limit=10, period_s=1)
    assert not refused.allowed and 0.4 < refused.retry_after_s <= 0.6
    await asyncio.sleep(refused.retry_after_s + 0.05)
    assert (await limiter.hit(key, cost=1, limit=10, period_s=1)).allowed


async def test_redis_buckets_are_shared_between_instances() -> None:
    a, b = RedisRateLimiter(REDIS_URL), RedisRateLimiter(REDIS_URL)
    key = secrets.token_hex(8)
    try:
        assert (await a.hit(key, cost=2, limit=3, period_s=60)).allowed
        assert (await b.hit(key, cost=1, limit=3, period_s=60)).allowed
        assert not (await a.hit(key, cost=1, limit=3, period_s=60)).allowed
    finally:
        await a.close()
        await b.close()


async def test_clients_get_rate_limited_with_retry_after(tmp_path: Path) -> None:
    server = await start_server(
        test_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
            tmp_path,
            rate_user_messages=2,
            max_message_chars=100,
        )
    )
    try:
        team = await make_team(server.state)
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=server.url) as client:
            sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
            ws = await WsClient.connect(server.ws_url, team.owner.api_key)
            too_long = await ws.request(
                {
                    "type": "message.send",
                    "session_id": sid,
                    "client_msg_id": "big",
                    "content": "x" * 101,
                }
            )
            assert too_long["code"] == "too_large"
            # REST: the same limit and answer, whatever the length.
            for length in (101, 200_000):
                r = await client.post(
                    f"/chat/sessions/{sid}/messages", json={"content": "x" * length}, headers=h
                )
                assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
            for n in range(2):
                r = await client.post(
                    f"/chat/sessions/{sid}/messages", json={"content": f"m{n}"}, headers=h
                )
                assert r.status_code == 201
            limited = await ws.request(
                {
                    "type": "message.send",
                    "session_id": sid,
                    "client_msg_id": "c3",
                    "content": "one more",
                }
            )
            assert limited["type"] == "error" and limited["code"] == "rate_limited"
            assert limited["retry_after_s"] > 0
            r = await client.post(
                f"/chat/sessions/{sid}/messages", json={"content": "again"}, headers=h
            )
            assert r.status_code == 429
            assert r.json()["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
            # a refused message was not stored, and a retry of a stored one is not charged
            msgs = (await client.get(f"/chat/sessions/{sid}/messages", headers=h)).json()["items"]
            assert [m["content"] for m in msgs if m["role"] == "user"] == ["m0", "m1"]
            await ws.close()
    finally:
        await server.stop()


async def test_the_token_limit_counts_what_the_model_read_and_wrote(tmp_path: Path) -> None:
    """A short message whose reply used more tokens than the limit allows:
    the reply is whole, and the next message waits, refused as over the
    token limit (not the message limit)."""
    server = await start_server(
        test_settings(
            f"sqlite+aiosqlite:///{tmp_path / 't.db'}",
            tmp_path,
            llm="scripted://?text=" + "word%20" * 400,
            rate_user_tokens=300,
        )
    )
    try:
        team = await make_team(server.state)
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
            first = await client.post(
                f"/chat/sessions/{sid}/messages", json={"content": "hi"}, headers=h
            )
            assert first.status_code == 201, first.text
            usage = first.json()["reply"]["usage"]
            assert usage["input_tokens"] + usage["output_tokens"] > 300, usage
            second = await client.post(
                f"/chat/sessions/{sid}/messages", json={"content": "and?"}, headers=h
            )
            assert second.status_code == 429, second.text
            body = second.json()
            assert body["code"] == "rate_limited" and "tokens" in body["detail"], body
            assert "messages" not in body["detail"]
    finally:
        await server.stop()


async def test_a_refused_message_takes_nothing_from_any_limit(tmp_path: Path) -> None:
    """One member over the token limit, retrying, does not use up the
    team's message limit: a refused message gives back what it took."""
    server = await start_server(
        test_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'n.db'}",
            tmp_path,
            llm="scripted://?text=" + "word%20" * 400,
            rate_user_tokens=300,
            rate_team_messages=3,
        )
    )
    try:
        team = await make_team(server.state)
        other = await team.actor("member")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            sid = (await client.post("/chat/sessions", json={}, headers=team.owner.headers)).json()[
                "id"
            ]
            post = f"/chat/sessions/{sid}/messages"
            first = await client.post(post, json={"content": "hi"}, headers=team.owner.headers)
            assert first.status_code == 201, first.text
            for _ in range(5):  # over the token limit now: refused each time
                r = await client.post(post, json={"content": "again"}, headers=team.owner.headers)
                assert r.status_code == 429 and "tokens" in r.json()["detail"], r.text
            theirs = await client.post(post, json={"content": "me?"}, headers=other.headers)
            assert theirs.status_code == 201, theirs.text
    finally:
        await server.stop()


async def test_redis_limiter_carries_on_after_its_connections_are_killed() -> None:
    """What a Redis restart does to a replica's pooled connections: the next
    hit (the next message sent) still gets an answer, not an error."""
    import redis.asyncio as aioredis

    name = f"rate-test-{secrets.token_hex(4)}"
    limiter = RedisRateLimiter(REDIS_URL, name=name)
    admin = aioredis.Redis.from_url(REDIS_URL)
    key = secrets.token_hex(8)
    try:
        assert (await limiter.hit(key, cost=1, limit=5, period_s=60)).allowed
        ids = [c["id"] for c in await admin.client_list() if c["name"] == name]
        assert ids
        for client_id in ids:
            await admin.client_kill_filter(_id=str(client_id))
        assert (await limiter.hit(key, cost=1, limit=5, period_s=60)).allowed
        await limiter.charge(key, cost=1, limit=5, period_s=60)
        for client_id in [c["id"] for c in await admin.client_list() if c["name"] == name]:
            await admin.client_kill_filter(_id=str(client_id))
        await limiter.charge(key, cost=1, limit=5, period_s=60)
        # 4 of 5 taken
        assert (await limiter.hit(key, cost=1, limit=5, period_s=60)).allowed
        assert not (await limiter.hit(key, cost=1, limit=5, period_s=60)).allowed
    finally:
        await limiter.close()
        await admin.aclose()
