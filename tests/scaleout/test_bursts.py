"""Bursts of Redis work on one instance, as when every client of a replica
reconnects at once after a deploy or a network blip.

Each join costs an instance several Redis commands (the seq floor, the last
seq, a catch-up read), and each command holds one pooled connection while it
is in flight. redis-py's default pool holds at most 100 connections and does
not block: the 101st concurrent command would fail with ``MaxConnectionsError``
(sockets closed with 1011 in a burst of 1000 joins). The instance's client
waits for a free connection instead.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from chathub.server.redis_bus import redis_client
from tests.harness import REDIS_URL
from tests.scaleout.conftest import redis_ping

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

BURST = 150


async def test_the_instances_redis_client_queues_a_burst_instead_of_failing() -> None:
    if not redis_ping():
        pytest.skip("Redis is not reachable")
    client = redis_client(REDIS_URL)
    key = f"chathub-test-burst-{secrets.token_hex(6)}"  # never written: BLPOP waits
    try:
        # 150 commands in flight at once, each holding its connection for
        # 0.5 s without blocking Redis for anyone else.
        results = await asyncio.gather(*(client.blpop([key], timeout=0.5) for _ in range(BURST)))
    finally:
        await client.aclose()
    assert results == [None] * BURST
