"""Restarting the shared services under a running cluster (destructive: these
stop the machine's Redis and PostgreSQL, so they run last and always bring
them back).

Redis is started again with exactly the command the CI uses (``.ci/run``);
with ``CHATHUB_TEST_REDIS_URL`` on another port (a private Redis for
development) the same flags with that port and a directory of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

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
    pg_ready,
    redis_address,
    redis_ping,
    send,
    stored_messages,
    wait_until,
)
from tests.wsclient import WsClient, reply_end

pytestmark = [
    pytest.mark.restarts,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.timeout(90),
]


# -- Redis ------------------------------------------------------------------


def redis_start_command() -> list[str]:
    host, port = redis_address()
    if port == 6379:
        return [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
            "--port", "6379", "--save", "", "--appendonly", "no",
            "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
        ]  # fmt: skip
    private = Path(tempfile.gettempdir()) / f"chathub-test-redis-{port}"
    private.mkdir(exist_ok=True)
    return [
        "redis-server", "--daemonize", "yes", "--bind", host,
        "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(private), "--logfile", str(private / "redis.log"),
    ]  # fmt: skip


async def stop_redis() -> None:
    host, port = redis_address()
    await asyncio.to_thread(
        subprocess.run,
        ["redis-cli", "-h", host, "-p", str(port), "shutdown", "nosave"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    await wait_until(lambda: not redis_ping(), timeout=10, what="Redis to stop")


async def start_redis() -> None:
    """Start Redis unless it answers; wait for PING."""
    if redis_ping():
        return
    await asyncio.to_thread(
        subprocess.run, redis_start_command(), capture_output=True, timeout=15, check=False
    )
    await wait_until(redis_ping, timeout=20, what="Redis to answer PING")


@pytest.fixture
async def redis_restored() -> AsyncIterator[None]:
    """Whatever the test does, Redis is up when it ends."""
    try:
        yield
    finally:
        await start_redis()


# -- PostgreSQL ---------------------------------------------------------------


PG_CLUSTERS = Path("/etc/postgresql")
HAVE_PG_CLUSTER = PG_CLUSTERS.is_dir() and any(PG_CLUSTERS.iterdir())


def pg_version() -> str:
    return sorted(p.name for p in PG_CLUSTERS.iterdir())[0]


def pg_ctl(action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", pg_version(), "main", action],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def ensure_pg() -> None:
    if await asyncio.to_thread(pg_ready):
        return
    await asyncio.to_thread(pg_ctl, "start")
    await wait_until(lambda: asyncio.to_thread(pg_ready), timeout=60, every=0.5, what="pg_isready")


@pytest.fixture
async def pg_restored() -> AsyncIterator[None]:
    if not HAVE_PG_CLUSTER:
        pytest.skip("no local PostgreSQL cluster to restart")
    try:
        yield
    finally:
        await ensure_pg()


# -- helpers ----------------------------------------------------------------


async def ready(instance: Instance) -> tuple[int, dict[str, Any]]:
    try:
        return await instance.readyz()
    except Exception as exc:
        return 0, {"error": repr(exc)}


async def reply_status(
    instance: Instance, deployment: Deployment, session_id: str, reply_id: str
) -> dict[str, Any] | None:
    for m in await stored_messages(instance, deployment, session_id):
        if m["id"] == reply_id:
            return m
    return None


# -- tests ----------------------------------------------------------------


async def _reply_cut_by_redis_restart(
    cluster: Cluster, deployment: Deployment
) -> tuple[Instance, Instance, str, str, WsClient, WsClient]:
    """A reply generated on B, watched from A, with Redis stopped after ten
    deltas and started again (empty: it keeps nothing on disk). Returns once
    both instances are ready again."""
    a, b = await cluster.start(2)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    on_b = await connect(b, deployment)
    try:
        await join(on_a, session_id)
        await join(on_b, session_id)
        reply_id = await send(on_b, session_id, "m1")
        await count_deltas(on_a, reply_id, 10)
        try:
            await stop_redis()
            for instance in (a, b):
                # Readiness reports the outage: the bus and the log, not the database.
                _, body = await wait_until(
                    partial(_unready, instance), timeout=15, what="/readyz to report the outage"
                )
                assert body["checks"]["bus"] != "ok"
                assert body["checks"]["session_log"] != "ok"
                assert body["checks"]["database"] == "ok"
                assert body["code"] == "unavailable" and "bus" in body["detail"]  # a problem
            await asyncio.sleep(2 * LEASE_TTL_S)  # an outage longer than a lease
        finally:
            await start_redis()
        for instance in (a, b):
            await wait_until(partial(_ready, instance), timeout=30, what=f"{instance.name} ready")
    except BaseException:
        await on_a.close()
        await on_b.close()
        raise
    return a, b, session_id, reply_id, on_a, on_b


async def test_redis_restart_mid_reply_recovers_and_loses_nothing_stored(
    cluster: Cluster, deployment: Deployment, redis_restored: None
) -> None:
    a, b, session_id, reply_id, on_a, on_b = await _reply_cut_by_redis_restart(cluster, deployment)
    try:
        # The cut reply waits the outage out (its appends are tried again, its
        # lease taken again) and ends as usual, with all its text, heard by
        # the socket that stayed connected through the outage.
        stored = await wait_until(
            lambda: _ended(a, deployment, session_id, reply_id),
            timeout=6 * LEASE_TTL_S,
            what="the cut reply to end",
        )
        await on_a.first(reply_end(reply_id), timeout=15)
        assert stored["status"] == "complete", stored
        assert stored["content"] == FULL_TEXT
        assert deltas(events(on_a.seen, session_id), reply_id) == FULL_TEXT

        # New messages work afterwards, seen live by sockets that stayed
        # connected through the outage, with seq going on from where it was.
        next_id = await send(on_a, session_id, "m2")
        await asyncio.gather(
            on_a.until(reply_end(next_id), timeout=15), on_b.until(reply_end(next_id), timeout=15)
        )
        turn = turn_events(on_a.seen, session_id, "m2", next_id)
        assert turn == turn_events(on_b.seen, session_id, "m2", next_id)
        assert turn[0]["seq"] > _last_seq_of(on_a.seen, session_id, reply_id)
        assert_contiguous(turn, first=turn[0]["seq"])
        assert [e["type"] for e in turn[:2]] == ["message.created", "reply.started"]
        assert deltas(turn, next_id) == FULL_TEXT
        assert ends(turn, next_id)[0]["type"] == "reply.completed"

        # Events from before the restart are gone from Redis: a resume from
        # there is told to reload over REST rather than given a partial list.
        late = await connect(b, deployment)
        try:
            ack = await join(late, session_id, after_seq=2)
            assert ack["recovered"] is False
        finally:
            await late.close()
    finally:
        await on_a.close()
        await on_b.close()

    # Nothing acknowledged is lost: both user messages and both replies.
    messages = await stored_messages(b, deployment, session_id)
    assert [(m["role"], m["client_msg_id"], m["status"]) for m in messages] == [
        ("user", "m1", "complete"),
        ("assistant", None, "complete"),
        ("user", "m2", "complete"),
        ("assistant", None, "complete"),
    ]
    assert messages[3]["content"] == FULL_TEXT


async def test_a_socket_hears_the_end_of_a_reply_cut_by_a_redis_restart(
    cluster: Cluster, deployment: Deployment, redis_restored: None
) -> None:
    a, _b, session_id, reply_id, on_a, on_b = await _reply_cut_by_redis_restart(cluster, deployment)
    try:
        stored = await wait_until(
            lambda: _ended(a, deployment, session_id, reply_id),
            timeout=6 * LEASE_TTL_S,
            what="the cut reply to end",
        )
        with contextlib.suppress(TimeoutError):
            await on_a.until(reply_end(reply_id), timeout=6 * LEASE_TTL_S)
        got = ends(on_a.seen, reply_id)
        assert len(got) == 1, f"the socket heard {len(got)} ends of the reply (stored: {stored})"
        (end,) = got
        assert end["type"] == "reply.completed"
        assert end["message"]["content"] == stored["content"] == FULL_TEXT
    finally:
        await on_a.close()
        await on_b.close()


async def test_after_a_redis_restart_seq_never_goes_back(
    cluster: Cluster, deployment: Deployment, redis_restored: None
) -> None:
    a, _b, session_id, _reply_id, on_a, on_b = await _reply_cut_by_redis_restart(
        cluster, deployment
    )
    (fresh,) = await cluster.start(1)  # a replica added after the restart
    on_fresh = await connect(fresh, deployment)
    try:
        await wait_until(
            lambda: _ended(a, deployment, session_id, _reply_id),
            timeout=6 * LEASE_TTL_S,
            what="the interrupted reply to end",
        )
        await join(on_fresh, session_id)
        next_id = await send(on_fresh, session_id, "m2")
        with contextlib.suppress(TimeoutError):
            await on_a.until(reply_end(next_id), timeout=15)
        turn = turn_events(on_a.seen, session_id, "m2", next_id)
        # The socket that stayed joined on A sees the whole new turn.
        assert [e["type"] for e in turn[:2]] == ["message.created", "reply.started"], turn[:3]
        assert deltas(turn, next_id) == FULL_TEXT
        assert turn[0]["seq"] > _last_seq_of(on_a.seen, session_id, _reply_id)
    finally:
        await on_fresh.close()
        await on_a.close()
        await on_b.close()


async def test_requests_during_a_redis_outage_are_refused_as_unavailable(
    cluster: Cluster, deployment: Deployment, redis_restored: None
) -> None:
    (a,) = await cluster.start(1)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    try:
        await join(on_a, session_id)
        try:
            await stop_redis()
            await wait_until(lambda: _unready(a), timeout=15, what="/readyz to report the outage")
            async with httpx.AsyncClient(base_url=a.url, timeout=15) as http:
                r = await http.post(
                    f"/chat/sessions/{session_id}/messages",
                    json={"content": "hi", "client_msg_id": "rest"},
                    headers=deployment.headers(),
                )
            try:
                answer = await on_a.request(
                    {
                        "type": "message.send",
                        "session_id": session_id,
                        "client_msg_id": "ws",
                        "content": "hi",
                    }
                )
            except websockets.ConnectionClosed as exc:
                answer = {"type": "closed", "code": exc.rcvd.code if exc.rcvd else None}
        finally:
            await start_redis()
        # Refused with the contract's code; the socket stays open.
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "unavailable"
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        assert (await on_a.request({"type": "ping"}))["type"] == "pong"
    finally:
        await on_a.close()
    # Nothing half-stored: a refused message leaves no row behind.
    assert await stored_messages(a, deployment, session_id) == []


def turn_events(
    frames: list[dict[str, Any]], session_id: str, client_msg_id: str, reply_id: str
) -> list[dict[str, Any]]:
    """The events of one turn: its user message, then its reply's."""
    return [
        e
        for e in events(frames, session_id)
        if e.get("reply_id") == reply_id
        or (e["type"] == "message.created" and e["message"]["client_msg_id"] == client_msg_id)
    ]


def _last_seq_of(frames: list[dict[str, Any]], session_id: str, reply_id: str) -> int:
    return max(int(e["seq"]) for e in events(frames, session_id) if e.get("reply_id") == reply_id)


async def _unready(instance: Instance) -> tuple[int, dict[str, Any]] | None:
    status, body = await ready(instance)
    return (status, body) if status == 503 else None


async def _ready(instance: Instance) -> bool:
    return (await ready(instance))[0] == 200


async def _ended(
    instance: Instance, deployment: Deployment, session_id: str, reply_id: str
) -> dict[str, Any] | None:
    m = await reply_status(instance, deployment, session_id, reply_id)
    return m if m is not None and m["status"] != "streaming" else None


async def test_postgres_restart_between_turns(
    cluster: Cluster, deployment: Deployment, pg_restored: None
) -> None:
    a, b = await cluster.start(2)
    session_id = await new_session(a, deployment)
    on_a = await connect(a, deployment)
    try:
        await join(on_a, session_id)
        first = await send(on_a, session_id, "m1")
        await on_a.until(reply_end(first), timeout=15)
        try:
            result = await asyncio.to_thread(pg_ctl, "restart")
            assert result.returncode == 0, result.stderr
            await wait_until(
                lambda: asyncio.to_thread(pg_ready), timeout=60, every=0.5, what="pg_isready"
            )
        finally:
            await ensure_pg()
        # Every pooled connection died with the server; pre-ping replaces
        # them, so the next turn on the same socket just works...
        second = await send(on_a, session_id, "m2")
        await on_a.until(reply_end(second), timeout=15)
        # ...and so does a new socket (authenticated from the database) on B.
        on_b = await connect(b, deployment)
        try:
            await join(on_b, session_id)
            third = await send(on_b, session_id, "m3")
            await on_a.until(reply_end(third), timeout=15)
        finally:
            await on_b.close()
    finally:
        await on_a.close()
    seen = events(on_a.seen, session_id)
    assert_contiguous(seen)
    for reply_id in (first, second, third):
        (end,) = ends(seen, reply_id)
        assert end["type"] == "reply.completed", end
        assert deltas(seen, reply_id) == FULL_TEXT
    # Nothing acknowledged was lost, before or after the restart.
    messages = await stored_messages(b, deployment, session_id)
    assert [(m["role"], m["client_msg_id"], m["status"]) for m in messages] == [
        ("user", "m1", "complete"),
        ("assistant", None, "complete"),
        ("user", "m2", "complete"),
        ("assistant", None, "complete"),
        ("user", "m3", "complete"),
        ("assistant", None, "complete"),
    ]
    assert [m["id"] for m in messages[1::2]] == [first, second, third]
    assert all(m["content"] == FULL_TEXT for m in messages[1::2])
