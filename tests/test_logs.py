"""Log lines: JSON or text, each with the ids bound where it was logged; and
``chathub serve`` writing them, with the request's id on its records and its
reply's records, and in the response."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chathub import logs
from tests.scaleout.conftest import reap, spawn_serve
from tests.test_cli import CHATHUB, run


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.StreamHandler[Any]]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("chathub.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, out, handler
    finally:
        logger.removeHandler(handler)


def test_a_json_line_carries_the_bound_ids(captured: Any) -> None:
    logger, out, handler = captured
    handler.setFormatter(logs.JsonFormatter())

    def log_some() -> None:
        logger.info("nothing bound")
        logs.bind(request="req-1", team="team-1")
        logs.bind(session="s-1", reply="r-1")
        logger.warning("a reply: %s ü", "x")
        logs.bind(reply=None)  # cleared; the others stay
        logger.info("no reply")

    contextvars.Context().run(log_some)  # nothing bound to begin with
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert set(first) == {"ts", "level", "logger", "message"}
    assert first["logger"] == "chathub.test-logs" and first["level"] == "info"
    assert first["ts"].endswith("+00:00")
    assert second["message"] == "a reply: x ü" and second["level"] == "warning"
    assert {k: second[k] for k in ("request_id", "team_id", "session_id", "reply_id")} == {
        "request_id": "req-1",
        "team_id": "team-1",
        "session_id": "s-1",
        "reply_id": "r-1",
    }
    assert "reply_id" not in third and third["session_id"] == "s-1"


def test_a_json_line_holds_the_traceback_on_one_line(captured: Any) -> None:
    logger, out, handler = captured
    handler.setFormatter(logs.JsonFormatter())
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        logger.exception("it failed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and record["message"] == "it failed"
    assert "Traceback" in record["exc"] and "ValueError: broken\nacross lines" in record["exc"]


def test_a_text_line_ends_with_the_bound_ids(captured: Any) -> None:
    logger, out, handler = captured
    handler.setFormatter(logs.TextFormatter())

    def log_some() -> None:
        logger.info("plain")
        logs.bind(team="t-9", reply="r-9")
        logger.info("about a reply")

    contextvars.Context().run(log_some)  # nothing bound to begin with
    plain, about = out.getvalue().splitlines()
    assert plain.endswith("INFO chathub.test-logs plain")
    assert about.endswith("about a reply [team_id=t-9 reply_id=r-9]")


async def test_ids_bound_in_a_task_stay_in_it_and_its_own_tasks() -> None:
    seen: dict[str, str | None] = {}

    async def child() -> None:
        seen["child"] = logs.reply_id.get()

    async def reply_task() -> None:
        logs.bind(reply="r-1")
        await asyncio.create_task(child())
        seen["task"] = logs.reply_id.get()

    def run_it() -> Any:
        return asyncio.get_running_loop().create_task(reply_task())

    await contextvars.Context().run(run_it)
    assert seen == {"child": "r-1", "task": "r-1"}
    assert logs.reply_id.get() is None


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"abc-123", True),
        (b"0b5e0e4c-8a1f-4f5e-9a0e-1f2e3d4c5b6a", True),
        (b"a" * 128, True),
        (b"a" * 129, False),
        (b"two words", False),
        (b"caf\xc3\xa9", False),
        (b"", False),
        (None, False),
    ],
)
def test_a_client_request_id_is_kept_only_when_it_looks_like_one(
    header: bytes | None, kept: bool
) -> None:
    got = logs.request_id_from(header)
    assert (got == (header or b"").decode("latin-1")) is kept
    assert got and len(got) <= 128 and " " not in got


# -- chathub serve ------------------------------------------------------------


async def test_serve_writes_json_lines_with_the_ids_of_each_request(tmp_path: Path) -> None:
    env = {
        "CHATHUB_DATA_DIR": str(tmp_path / "data"),
        "CHATHUB_LOG_FORMAT": "json",
        # One retry before the first token: a warning logged by the reply task.
        "CHATHUB_LLM": "scripted://?text=fine&fail_before=overloaded&fail_times=1",
        # Forwarded headers believed only from this proxy (not this client).
        "CHATHUB_FORWARDED_ALLOW_IPS": "192.0.2.1",
    }
    code, out, err = await run(
        str(CHATHUB), "admin", "bootstrap", "--team", "Logs", "--email", "o@logs.example", env=env
    )
    assert code == 0, err
    created = json.loads(out.splitlines()[-1])
    # The migrations' progress, as JSON lines too.
    assert all(json.loads(line)["logger"] for line in err.splitlines())
    headers = {"Authorization": f"Bearer {created['api_key']}"}

    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    log = tmp_path / "serve.log"
    server = spawn_serve("serve", clean | env, log, tmp_path)
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=15) as http:
            created_session = await http.post("/chat/sessions", json={})
            generated = created_session.headers["x-request-id"]
            session_id = created_session.json()["id"]
            sent = await http.post(
                f"/chat/sessions/{session_id}/messages",
                json={"content": "hi"},
                headers={"X-Request-ID": "turn-42"},
            )
            assert sent.status_code == 201, sent.text
            assert sent.headers["x-request-id"] == "turn-42"
            reply_id = sent.json()["reply"]["id"]
            forwarded = await http.get("/chat/sessions", headers={"X-Forwarded-For": "203.0.113.7"})
            assert forwarded.status_code == 200
            refused = await http.get("/chat/sessions", headers={"Authorization": "Bearer nope"})
            assert refused.status_code == 401 and refused.headers["x-request-id"]
    finally:
        await reap(server.proc)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    (create_line,) = [r for r in access if '"POST /chat/sessions HTTP' in r["message"]]
    assert create_line["request_id"] == generated
    assert create_line["team_id"] == created["team_id"]
    (send_line,) = [r for r in access if "/messages" in r["message"]]
    assert send_line["request_id"] == "turn-42"
    # The reply's own task logs with the ids of the reply and of the request
    # that sent its message.
    (retry,) = [r for r in records if r["logger"] == "chathub.llm.retry"]
    assert retry["level"] == "warning"
    assert {k: retry[k] for k in ("request_id", "team_id", "session_id", "reply_id")} == {
        "request_id": "turn-42",
        "team_id": created["team_id"],
        "session_id": session_id,
        "reply_id": reply_id,
    }
    (listed,) = [r for r in access if '"GET /chat/sessions HTTP/1.1" 200' in r["message"]]
    assert listed["message"].startswith("127.0.0.1:"), listed  # not the forwarded address
    (refused_line,) = [r for r in access if '" 401' in r["message"]]
    assert "team_id" not in refused_line


async def test_bad_settings_exit_2_with_what_to_change(tmp_path: Path) -> None:
    code, _, err = await run(
        str(CHATHUB), "db", "upgrade",
        env={"CHATHUB_DATA_DIR": str(tmp_path), "CHATHUB_LOG_FORMAT": "xml"},
    )  # fmt: skip
    assert code == 2
    assert err.startswith("chathub: bad settings: CHATHUB_LOG_FORMAT:"), err
    assert "Traceback" not in err
