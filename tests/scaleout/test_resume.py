"""Reconnecting elsewhere: a client cut off mid-reply joins another instance
with ``after_seq`` and misses nothing, repeats nothing."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.scaleout.conftest import (
    FULL_TEXT,
    WORDS,
    Cluster,
    Deployment,
    Instance,
    assert_contiguous,
    connect,
    count_deltas,
    deltas,
    ends,
    events,
    join,
    new_session,
    send,
    stored_reply,
)
from tests.wsclient import reply_end

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(90)]

CLIENTS = 20


async def _cut_and_resume(
    index: int,
    first: Instance,
    second: Instance,
    deployment: Deployment,
    rng: random.Random,
) -> dict[str, Any]:
    """Send in a session of one's own on ``first``, drop the socket after a
    few deltas (half of them cleanly, half by cutting the TCP connection),
    wait a little (events keep coming meanwhile), resume on
    ``second``; everything the client received, and what is stored."""
    session_id = await new_session(first, deployment, f"resume {index}")
    cut_after = rng.randint(1, WORDS // 2)
    pause = rng.uniform(0.05, 0.5)
    before = await connect(first, deployment)
    try:
        await join(before, session_id)
        reply_id = await send(before, session_id, f"m{index}")
        await count_deltas(before, reply_id, cut_after)
    finally:
        if index % 2:
            before.conn.transport.abort()  # gone without a close frame
        await before.close()
    received = events(before.seen, session_id)
    assert not ends(received, reply_id), "the reply ended before the cut; slow the script down"
    last_seq = received[-1]["seq"]
    await asyncio.sleep(pause)
    after = await connect(second, deployment)
    try:
        ack = await join(after, session_id, after_seq=last_seq)
        await after.until(reply_end(reply_id), timeout=20)
    finally:
        await after.close()
    return {
        "session_id": session_id,
        "reply_id": reply_id,
        "cut_after": cut_after,
        "ack": ack,
        "received": received + events(after.seen, session_id),
        "stored": await stored_reply(second, deployment, session_id, reply_id),
    }


async def test_clients_resume_on_another_instance_without_gap_or_repeat(
    cluster: Cluster, deployment: Deployment
) -> None:
    instances = await cluster.start(3)
    rng = random.Random(20240611)
    results = await asyncio.gather(
        *(
            _cut_and_resume(
                i, instances[i % 3], instances[(i + 1) % 3], deployment, random.Random(rng.random())
            )
            for i in range(CLIENTS)
        )
    )
    for result in results:
        reply_id, received = result["reply_id"], result["received"]
        assert result["ack"]["recovered"] is True, result["ack"]
        # Every event of the session, each once, in order: seq 1, 2, 3, ...
        assert_contiguous(received)
        assert [e["type"] for e in received].count("reply.started") == 1
        (end,) = ends(received, reply_id)
        assert end["type"] == "reply.completed", end
        streamed = deltas(received, reply_id)
        assert streamed == FULL_TEXT, f"cut after {result['cut_after']} deltas"
        assert result["stored"]["content"] == streamed
        assert result["stored"]["status"] == "complete"
