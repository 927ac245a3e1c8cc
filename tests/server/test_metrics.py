"""The metrics DESIGN lists, read from ``/metrics`` of a running server
before and after what they count: frames in and out, replies by end state,
time to first token, tokens per second, provider errors (retried ones too)
and resumes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from chathub.auth import Principal
from chathub.server import metrics
from chathub.server.connection import Connection
from chathub.server.hub import Hub
from chathub.server.session_log import MemorySessionLog
from tests.harness import eventually, serve
from tests.server.test_ws import (
    custom_server,
    new_session,
    reply_finished,
    scripted,
    send_message,
)
from tests.wsclient import WsClient

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    text = (await client.get("/metrics")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_a_turn_with_a_retry_and_a_resume_is_counted(tmp_path: Path) -> None:
    # The provider is overloaded once before the first token, then streams.
    llm = scripted(text="one two three four ", chunk=4, fail_before="overloaded", fail_times=1)
    async with custom_server(tmp_path, llm=llm, coalesce_ms=0) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        before = await scrape(s.client)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            done = await reply_finished(ws, ack["reply_id"])
            resumed = await ws.request({"type": "join", "session_id": sid, "after_seq": 1})
            await ws.request({"type": "ping"})
        finally:
            await ws.close()
        after = await scrape(s.client)

    assert done["stop_reason"] == "end_turn" and resumed["recovered"] is True
    assert grown(before, after, "chathub_provider_errors_total", code="overloaded") == 1
    assert grown(before, after, "chathub_replies_total", stop_reason="end_turn") == 1
    assert grown(before, after, "chathub_time_to_first_token_seconds_count") == 1
    assert grown(before, after, "chathub_reply_tokens_per_second_count") == 1
    assert grown(before, after, "chathub_resumes_total", recovered="true") == 1
    # join, message.send, join, ping
    assert grown(before, after, "chathub_frames_in_total") == 4
    # welcome, three acks, the pong, and the turn's events: live, then again
    # after seq 1 for the second join (a heartbeat may add one)
    events = done["seq"]
    assert grown(before, after, "chathub_frames_out_total") >= 5 + events + (events - 1)


async def test_cancelled_and_unrecoverable_are_counted(tmp_path: Path) -> None:
    llm = scripted(text="word " * 200, chunk=5, rate=50)
    async with custom_server(tmp_path, llm=llm, coalesce_ms=0, session_log_length=3) as s:
        owner = s.team.owner
        sid = await new_session(s.client, owner)
        before = await scrape(s.client)
        ws = await WsClient.connect(s.server.ws_url, owner.api_key)
        try:
            await ws.request({"type": "join", "session_id": sid})
            ack = await send_message(ws, sid, "c1")
            await ws.until(lambda f: f["type"] == "reply.delta")
            await ws.request({"type": "reply.cancel", "reply_id": ack["reply_id"]})
            done = await reply_finished(ws, ack["reply_id"])
            lost = await ws.request({"type": "join", "session_id": sid, "after_seq": 0})
        finally:
            await ws.close()
        after = await scrape(s.client)

    assert done["stop_reason"] == "cancelled" and lost["recovered"] is False
    assert grown(before, after, "chathub_replies_total", stop_reason="cancelled") == 1
    assert grown(before, after, "chathub_resumes_total", recovered="false") == 1
    assert grown(before, after, "chathub_provider_errors_total", code="overloaded") == 0


async def test_the_send_queue_gauge_is_kept_current_between_scrapes() -> None:
    """Each heartbeat records the frames queued on the instance (under
    ``--workers`` a scrape reads what each worker last recorded)."""
    hub = Hub(MemorySessionLog())
    conn = Connection(None, "c1", Principal("m1", "t1", "member"), max_queue=100)
    hub.register(conn)
    try:
        for n in range(3):
            conn.send(f'{{"type": "x", "n": {n}}}')
        metrics.SEND_QUEUE_DEPTH.set(0)
        hub.start_heartbeats(0.02)
        await eventually(lambda: (REGISTRY.get_sample_value("chathub_send_queue_depth") or 0) >= 3)
    finally:
        await hub.close()


async def test_unknown_http_methods_share_one_label_value() -> None:
    """uvicorn's h11 server hands the app any method token a client sends:
    they are counted as ``other``, so the label cannot grow without bound."""

    async def hello(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server, task, port = await serve(metrics.HttpMetrics(hello), http="h11")
    try:
        for method in ("BREW", "WHEN1", "GET"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{method} /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            assert (await reader.read()).startswith(b"HTTP/1.1 405")
            writer.close()
    finally:
        server.should_exit = True
        await task
    methods = {
        sample.labels["method"]
        for family in REGISTRY.collect()
        if family.name == "chathub_http_request_seconds"
        for sample in family.samples
        if sample.labels.get("route") == "unmatched" and sample.labels.get("status") == "405"
    }
    assert methods == {"other", "GET"}
