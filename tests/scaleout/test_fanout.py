"""One reply, two instances: a socket on each sees the same events.

The reply is generated on B (``message.send`` arrives there); the socket on A
sees it only through Redis (the session log's pub/sub and streams).
"""

from __future__ import annotations

import asyncio

import pytest

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
