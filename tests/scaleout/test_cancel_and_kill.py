"""Stopping a reply from elsewhere: ``reply.cancel`` on another instance, and
the death (SIGKILL) of the instance generating it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import pytest

from tests.scaleout.conftest import (
    FULL_TEXT,
    LEASE_TTL_S,
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
    script_text,
    scripted_llm,
    send,
    stored_reply,
    wait_until,
)
from tests.wsclient import WsClient, reply_end

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(90)]


async def test_cancel_on_one_instance_stops_a_reply_generated_on_another(
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
        await count_deltas(on_a, reply_id, 10)
        ack = await on_a.request({"type": "reply.cancel", "reply_id": reply_id})
        assert ack == {"type": "ack", "id": ack["id"], "reply_id": reply_id, "cancelling": True}
        cancelled_at = time.monotonic()
        await asyncio.gather(
            on_a.until(reply_end(reply_id), timeout=10),
            on_b.until(reply_end(reply_id), timeout=10),
        )
        took = time.monotonic() - cancelled_at
    finally:
        await on_a.close()
        await on_b.close()

    seen_a, seen_b = events(on_a.seen, session_id), events(on_b.seen, session_id)
    assert seen_a == seen_b
    assert_contiguous(seen_a)
    (end,) = ends(seen_a, reply_id)
    assert end["type"] == "reply.completed"
    assert end["stop_reason"] == "cancelled"
    # Stopped promptly (the whole reply takes 2.5 s; 10 deltas were seen).
    assert took < 1.5
    partial = deltas(seen_a, reply_id)
    assert partial and FULL_TEXT.startswith(partial) and partial != FULL_TEXT
    assert end["message"]["content"] == partial
    stored = await stored_reply(a, deployment, session_id, reply_id)
    assert stored["content"] == partial
    assert stored["status"] == "complete"


async def test_a_killed_instance_s_reply_ends_as_interrupted_elsewhere(
    cluster: Cluster, deployment: Deployment
) -> None:
    a, b, c = await cluster.start(3)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_c = await connect(c, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        await join(on_c, session_id)
        reply_id = await send(on_b, session_id, "m1")
        await count_deltas(on_a, reply_id, 20)
        b.kill9()
        killed_at = time.monotonic()
        await asyncio.gather(
            on_a.until(reply_end(reply_id), timeout=6 * LEASE_TTL_S),
            on_c.until(reply_end(reply_id), timeout=6 * LEASE_TTL_S),
        )
        took = time.monotonic() - killed_at
        # Nothing more about this reply follows: no completion, no second end.
        with pytest.raises(TimeoutError):
            await on_a.until(lambda f: f.get("reply_id") == reply_id, timeout=2 * LEASE_TTL_S)
        seen_a, seen_c = events(on_a.seen, session_id), events(on_c.seen, session_id)
        assert seen_a == seen_c
        assert_contiguous(seen_a)
        (end,) = ends(seen_a, reply_id)
        assert end["type"] == "reply.failed", end
        assert end["code"] == "interrupted"
        assert end["retryable"] is True
        # The lease lapses within one TTL of the last renewal and a reaper
        # runs every TTL/2: a few TTLs at most.
        assert took < 3 * LEASE_TTL_S, f"ended {took:.1f} s after the kill"
        # The text kept is exactly what was streamed before the kill.
        partial = deltas(seen_a, reply_id)
        assert len(partial) >= 20 * 5 and FULL_TEXT.startswith(partial)
        assert partial != FULL_TEXT
        assert end["partial"]["content"] == partial
        assert end["partial"]["status"] == "failed"
        stored = await stored_reply(a, deployment, session_id, reply_id)
        assert stored["status"] == "failed"
        assert stored["content"] == partial

        # The session is free again: the next message gets a full reply.
        next_id = await send(on_c, session_id, "m2")
        frames = await on_a.until(reply_end(next_id), timeout=15)
        assert frames[-1]["type"] == "reply.completed"
        assert deltas(frames, next_id) == FULL_TEXT
        assert_contiguous(events(on_a.seen, session_id))
    finally:
        await on_a.close()
        await on_c.close()
        await on_b.close()


async def killed_mid_reply(
    instance: Instance, sender: WsClient, watcher: WsClient, session_id: str, *, after_deltas: int
) -> tuple[str, dict[str, Any]]:
    """Send a message over ``sender`` (a socket on ``instance``) and SIGKILL
    ``instance`` once ``watcher`` has ``after_deltas`` deltas of the reply:
    the reply's id and the ending ``watcher`` gets for it."""
    reply_id = await send(sender, session_id, "killed")
    await count_deltas(watcher, reply_id, after_deltas)
    instance.kill9()
    frames = await watcher.until(reply_end(reply_id), timeout=6 * LEASE_TTL_S)
    return reply_id, frames[-1]


async def test_a_killed_instance_s_reply_is_kept_whole_when_the_log_lost_older_turns(
    cluster: Cluster, deployment: Deployment
) -> None:
    # A log window of 60 events: after two whole turns (206 events) Redis has
    # trimmed the session's first ones, but still holds all of the third.
    a, b = await cluster.start(2, session_log_length=60)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        for turn in ("m1", "m2"):
            done = await on_a.until(reply_end(await send(on_a, session_id, turn)), timeout=15)
            assert done[-1]["type"] == "reply.completed"
        watcher = await connect(a, deployment)
        try:
            assert (await join(watcher, session_id, after_seq=0))["recovered"] is False
        finally:
            await watcher.close()

        reply_id, end = await killed_mid_reply(b, on_b, on_a, session_id, after_deltas=20)
    finally:
        await on_a.close()
        await on_b.close()

    assert end["type"] == "reply.failed" and end["code"] == "interrupted", end
    # All of it, from the log: exactly what was streamed before the kill.
    partial = deltas(on_a.seen, reply_id)
    assert len(partial) >= 20 * 5 and FULL_TEXT.startswith(partial)
    assert end["partial"]["content"] == partial
    assert (await stored_reply(a, deployment, session_id, reply_id))["content"] == partial
    assert_contiguous(events(on_a.seen, session_id))


async def test_a_killed_instance_s_reply_longer_than_the_log_keeps_its_checkpoint(
    cluster: Cluster, deployment: Deployment
) -> None:
    # 300 deltas at 200 a second into a log window of 60 events: by the
    # 200th, Redis no longer holds the reply's start.
    text = script_text(300)
    a, b = await cluster.start(
        2, session_log_length=60, llm=scripted_llm(text, rate=200), reply_checkpoint_s=0.2
    )
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        reply_id, end = await killed_mid_reply(b, on_b, on_a, session_id, after_deltas=200)
    finally:
        await on_a.close()
        await on_b.close()

    assert end["type"] == "reply.failed" and end["code"] == "interrupted", end
    # The last checkpoint: some of what was streamed, never more.
    seen = deltas(on_a.seen, reply_id)
    kept = end["partial"]["content"]
    assert kept and seen.startswith(kept) and text.startswith(seen), (kept, seen)
    assert (await stored_reply(a, deployment, session_id, reply_id))["content"] == kept
    # The log kept its count: the ending follows the last delta, no gap.
    assert_contiguous(events(on_a.seen, session_id))


def stopped_as_stale(log: str) -> bool:
    return "ended or replaced elsewhere" in log or "lost its lease" in log


async def test_a_paused_instance_s_reply_appends_nothing_after_it_was_ended_elsewhere(
    cluster: Cluster, deployment: Deployment
) -> None:
    """An instance stopped (SIGSTOP: a long GC pause, a frozen VM) past its
    lease: another ends its reply as interrupted and the session takes its
    next reply; when the paused one wakes, the log refuses its stale deltas,
    so every socket sees the ended reply's deltas equal to its stored text
    and the next reply's stream whole. Coalesced, as by default: deltas are
    then written by timers as well as by the stream."""
    a, b = await cluster.start(2, coalesce_ms=30)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        reply_id = await send(on_b, session_id, "m1")
        await count_deltas(on_a, reply_id, 10)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            await on_a.until(reply_end(reply_id), timeout=6 * LEASE_TTL_S)
            next_id = await send(on_a, session_id, "m2")
            await count_deltas(on_a, next_id, 5)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        frames = await on_a.until(reply_end(next_id), timeout=30)
        assert frames[-1]["type"] == "reply.completed", frames[-1]
        # Give the woken instance time to try (and fail) to write more.
        with pytest.raises(TimeoutError):
            await on_a.until(lambda f: f.get("reply_id") == reply_id, timeout=2 * LEASE_TTL_S)
        seen = events(on_a.seen, session_id)
        assert_contiguous(seen)
        (end,) = ends(seen, reply_id)
        assert end["type"] == "reply.failed" and end["code"] == "interrupted", end
        first_after_end = next(i for i, f in enumerate(seen) if f is end) + 1
        assert not [f for f in seen[first_after_end:] if f.get("reply_id") == reply_id]
        assert deltas(seen, reply_id) == end["partial"]["content"]
        assert deltas(seen, next_id) == FULL_TEXT
        stored = await stored_reply(a, deployment, session_id, reply_id)
        assert stored["status"] == "failed" and stored["content"] == end["partial"]["content"]
        # The woken instance stopped its reply (refused by the log, while
        # streaming or at its end, or told by its lease, whichever came
        # first), with no error left unhandled.
        await wait_until(lambda: stopped_as_stale(b.log.read_text()), timeout=10)
        assert "never retrieved" not in b.log.read_text()
    finally:
        await on_a.close()
        with contextlib.suppress(Exception):
            await on_b.close()
