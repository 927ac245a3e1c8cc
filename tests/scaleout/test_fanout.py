"""One reply, two instances: a socket on each sees the same events.

The reply is generated on B (``message.send`` arrives there); the socket on A
sees it only through Redis (the session log's pub/sub and streams).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from chathub.server.redis_log import ShardedSessionLog
from tests.scaleout.conftest import (
    FULL_TEXT,
    Cluster,
    Deployment,
    assert_contiguous,
    connect,
    deltas,
    ends,
    events,
    join,
    new_session,
    send,
    stored_reply,
)
from tests.server.test_session_log_contract import SHARD_URLS
from tests.wsclient import reply_end

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(90)]


async def test_sockets_on_two_instances_see_the_same_reply(
    cluster: Cluster, deployment: Deployment
) -> None:
    a, b = await cluster.start(2)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        await join(on_b, session_id)
        reply_id = await send(on_b, session_id, "m1")
        await asyncio.gather(
            on_a.until(reply_end(reply_id), timeout=15),
            on_b.until(reply_end(reply_id), timeout=15),
        )
    finally:
        await on_a.close()
        await on_b.close()

    seen_a, seen_b = events(on_a.seen, session_id), events(on_b.seen, session_id)
    # Identical, frame for frame, in seq order with no gap from the first one.
    assert seen_a == seen_b
    assert_contiguous(seen_a)
    types = [e["type"] for e in seen_a]
    assert types[:2] == ["message.created", "reply.started"]
    assert types[-1] == "reply.completed"
    assert set(types[2:-1]) == {"reply.delta"}
    # Every token arrived, and the stored reply is what was streamed.
    streamed = deltas(seen_a, reply_id)
    assert streamed == FULL_TEXT
    (end,) = ends(seen_a, reply_id)
    assert end["stop_reason"] == "end_turn"
    assert end["message"]["content"] == streamed
    stored = await stored_reply(a, deployment, session_id, reply_id)
    assert stored["status"] == "complete"
    assert stored["content"] == streamed


async def test_a_sharded_session_log_carries_sessions_on_every_shard(
    cluster: Cluster, deployment: Deployment
) -> None:
    """Two instances with the session log sharded over two Redis databases:
    replies generated on B, for sessions on both shards, reach a socket on A
    whole and in order, and a socket joining late on A resumes from either."""
    shards = ShardedSessionLog(SHARD_URLS, prefix="chathub")  # for shard_of only
    a, b = await cluster.start(2, redis_log_shards=json.dumps(SHARD_URLS))
    sessions: list[str] = []
    homes: set[int] = set()
    while len(homes) < 2 or len(sessions) < 4:
        sid = await new_session(a, deployment)
        sessions.append(sid)
        homes.add(shards.shards.index(shards.shard_of(sid)))
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        for sid in sessions:
            await join(on_a, sid)
        replies = [await send(on_b, sid, f"m-{n}") for n, sid in enumerate(sessions)]
        for reply_id in replies:  # they end in any order
            await on_a.first(reply_end(reply_id), timeout=15)
    finally:
        await on_a.close()
        await on_b.close()
    for sid, reply_id in zip(sessions, replies, strict=True):
        seen = events(on_a.seen, sid)
        assert_contiguous(seen)
        assert deltas(seen, reply_id) == FULL_TEXT
        stored = await stored_reply(a, deployment, sid, reply_id)
        assert stored["content"] == FULL_TEXT

    late = await connect(a, deployment)
    try:
        for sid in sessions:
            ack = await late.request({"type": "join", "session_id": sid, "after_seq": 0})
            assert ack["type"] == "ack" and ack["recovered"] is True, ack

        for reply_id in replies:  # every session caught up, to its end
            await late.first(reply_end(reply_id), timeout=15)
        for sid in sessions:
            assert_contiguous(events(late.seen, sid))
    finally:
        await late.close()
        for url in SHARD_URLS:
            client = aioredis.Redis.from_url(url)
            await client.delete("chathub:log-shard")
            await client.aclose()
