"""Prometheus metrics (the default registry; one process, one set).

Under ``chathub serve --workers N`` the workers share one port, so a scrape
reaches any one of them: there each worker keeps its values in files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, which
the command sets up), and :func:`exposition` answers with every worker's,
counters summed and the gauges summed over the live workers.

``chathub_provider_errors_total`` is defined in ``chathub.llm.retry``,
where provider calls are made and their errors counted."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_SOCKETS = Gauge(
    "chathub_open_sockets", "Open WebSocket connections", multiprocess_mode="livesum"
)
FRAMES_IN = Counter("chathub_frames_in_total", "Client frames received")
FRAMES_OUT = Counter("chathub_frames_out_total", "Frames sent to clients")
SLOW_CLOSES = Counter("chathub_slow_client_closes_total", "Sockets closed for a full send queue")
SOCKET_CAP_CLOSES = Counter(
    "chathub_socket_cap_closes_total",
    "Sockets closed (4429) for their member's open sockets on this instance"
    " (CHATHUB_WS_MAX_PER_MEMBER)",
)
RESUMES = Counter("chathub_resumes_total", "Joins with after_seq", ["recovered"])
REPLIES = Counter("chathub_replies_total", "Replies by end state", ["stop_reason"])
TIME_TO_FIRST_TOKEN = Histogram(
    "chathub_time_to_first_token_seconds",
    "From reply start to its first token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TOKENS_PER_SECOND = Histogram(
    "chathub_reply_tokens_per_second",
    "Output tokens per second of finished replies",
    buckets=(1, 5, 10, 25, 50, 100, 250, 1000, 10000),
)
GUARDRAIL_ACTIONS = Counter(
    "chathub_guardrail_actions_total", "Guardrail actions by rule", ["action", "rule"]
)
HTTP_LATENCY = Histogram(
    "chathub_http_request_seconds", "HTTP latency by route", ["method", "route", "status"]
)
SEND_QUEUE_DEPTH = Gauge(
    "chathub_send_queue_depth", "Frames queued for sockets, in total", multiprocess_mode="livesum"
)
BUS_LAG = Histogram(
    "chathub_bus_lag_seconds",
    "Round trip of a PING on this instance's Redis pub/sub connection, read behind"
    " everything queued before it: how late that connection's messages are handled",
    ["subscription"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LOG_APPEND_RETRIES = Counter(
    "chathub_log_append_retries_total",
    "Session log appends tried again while the log's Redis was unreachable",
)
LOG_APPENDS_FAILED = Counter(
    "chathub_log_appends_failed_total",
    "Session log appends given up after waiting for Redis: the event was not written",
)
REPLY_ENDINGS_LOST = Counter(
    "chathub_reply_endings_lost_total",
    "Replies that could not be ended (stored or announced) with the database or"
    " the log unreachable; a reaper ends them later",
)


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def exposition() -> bytes:
    """The metrics, in Prometheus's text format: this process's, or with
    several workers (``PROMETHEUS_MULTIPROC_DIR`` set) all of theirs."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def forget_dead_workers() -> None:
    """A worker starting (uvicorn replaces one that died) drops the live
    gauges of workers that are gone without stopping: killed, they never ran
    :func:`process_exiting`, and their open sockets would count for ever."""
    directory = os.environ.get(MULTIPROCESS_DIR)
    if not directory:
        return
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_exiting() -> None:
    """A worker is stopping: its live gauges (open sockets, queued frames)
    no longer count. Its counters stay in the sums."""
    if os.environ.get(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
)
"""The methods that get a label value of their own; any other (uvicorn's
h11 server passes whatever token a client sends) counts as ``other``, so
clients cannot make the label's values grow without bound."""


class HttpMetrics:
    """Latency of every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            HTTP_LATENCY.labels(method, path, str(status)).observe(time.perf_counter() - started)
