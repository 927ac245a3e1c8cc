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
from tests.scaleout.conftest import Instance, reap, spawn_serve
from tests.test_cli import CHATHUB, run
from tests.wsclient import WsClient


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


async def bootstrapped_server(
    tmp_path: Path, env: dict[str, str]
) -> tuple[dict[str, str], Instance, Path, str]:
    """A team bootstrapped with ``env``, then ``chathub serve`` started with
    it (not waited for), logging to a file: what the bootstrap printed (the
    team's id, the owner's API key), the server, its log, and what the
    bootstrap wrote to stderr."""
    code, out, err = await run(
        str(CHATHUB), "admin", "bootstrap", "--team", "Logs", "--email", "o@logs.example", env=env
    )
    assert code == 0, err
    created: dict[str, str] = json.loads(out.splitlines()[-1])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    log = tmp_path / "serve.log"
    return created, spawn_serve("serve", clean | env, log, tmp_path), log, err


async def test_serve_writes_json_lines_with_the_ids_of_each_request(tmp_path: Path) -> None:
    env = {
        "CHATHUB_DATA_DIR": str(tmp_path / "data"),
        "CHATHUB_LOG_FORMAT": "json",
        # One retry before the first token: a warning logged by the reply task.
        "CHATHUB_LLM": "scripted://?text=fine&fail_before=overloaded&fail_times=1",
        # Forwarded headers believed only from this proxy (not this client).
        "CHATHUB_FORWARDED_ALLOW_IPS": "192.0.2.1",
    }
    created, server, log, err = await bootstrapped_server(tmp_path, env)
    # The migrations' progress, as JSON lines too.
    assert all(json.loads(line)["logger"] for line in err.splitlines())
    headers = {"Authorization": f"Bearer {created['api_key']}"}
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


# -- no credential in the log -------------------------------------------------

API_KEY = "chk_8294b205_ZEWbwZpMJHYvr-6CxKfNbX_jBWgBLDcYlhjGHNf1_7U"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwMWEyMjZmMSJ9"
    ".Zm9vYmFyYmF6cXV4LXNpZ25hdHVyZV9vZl90aGVfdG9rZW4"
)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"< authorization: Bearer {API_KEY}", "< authorization: Bearer ***"),
        (f"authorization: bearer {JWT}", "authorization: bearer ***"),
        # websockets logs a long frame cut in the middle: the tail goes too
        (
            """< TEXT '{"type": "auth", "token": "chk_8294b205_ZEWbwZp..._jBWgBLDcYlhjGHNf1_7U"}""",
            """< TEXT '{"type": "auth", "token": "***"}""",
        ),
        (f"{{'access_token': '{JWT}', 'x': 1}}", "{'access_token': '***', 'x': 1}"),
        (f"key {API_KEY} used", "key chk_8294b205_*** used"),
        (f"a token {JWT}.", "a token eyJ***."),
        ("a token of thanks, chk_ nothing", "a token of thanks, chk_ nothing"),
    ],
)
def test_credentials_are_masked(text: str, masked: str) -> None:
    assert logs.redact(text) == masked


def test_the_handler_drops_traffic_debug_records_and_masks_the_others(captured: Any) -> None:
    _, out, handler = captured
    handler.addFilter(logs.Redaction())
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    try:
        for name in ("uvicorn.error", "websockets.server", "aiosqlite"):
            traffic = logging.getLogger(name)
            traffic.addHandler(handler)
            traffic.setLevel(logging.DEBUG)
            traffic.propagate = False
            traffic.debug("< authorization: Bearer %s", API_KEY)
            traffic.info("kept, and masked: %s", API_KEY)
        own = logging.getLogger("chathub.test-logs")
        own.setLevel(logging.DEBUG)
        own.debug("a debug line of our own with %s", JWT)
    finally:
        for name in ("uvicorn.error", "websockets.server", "aiosqlite"):
            traffic = logging.getLogger(name)
            traffic.removeHandler(handler)
            traffic.setLevel(logging.NOTSET)
            traffic.propagate = True
    assert out.getvalue().splitlines() == [
        "uvicorn.error INFO kept, and masked: chk_8294b205_***",
        "websockets.server INFO kept, and masked: chk_8294b205_***",
        "aiosqlite INFO kept, and masked: chk_8294b205_***",
        "chathub.test-logs DEBUG a debug line of our own with eyJ***",
    ]


async def test_serve_at_debug_writes_no_key_or_token(tmp_path: Path) -> None:
    """API keys and JWTs used over REST, in a socket's upgrade and in its
    ``auth`` frame: none of them in the log of a server at debug level,
    which still writes chathub's own debug lines."""
    env = {
        "CHATHUB_DATA_DIR": str(tmp_path / "data"),
        "CHATHUB_LOG_FORMAT": "json",
        "CHATHUB_LOG_LEVEL": "debug",
        "CHATHUB_LLM": "scripted://?text=fine",
    }
    created, server, log, _ = await bootstrapped_server(tmp_path, env)
    api_key = created["api_key"]
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            r = await http.post("/auth/token", json={"api_key": api_key})
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            for credential in (api_key, token):
                r = await http.get(
                    "/chat/sessions", headers={"Authorization": f"Bearer {credential}"}
                )
                assert r.status_code == 200, r.text
            r = await http.get("/chat/sessions", headers={"Authorization": "Bearer abc.def.ghi"})
            assert r.status_code == 401, r.text
        ws_url = server.url.replace("http", "ws") + "/ws"
        for credential in (api_key, token):
            for first_frame_auth in (False, True):
                ws = await WsClient.connect(ws_url, credential, first_frame_auth=first_frame_auth)
                assert ws.welcome["type"] == "welcome"
                await ws.close()
    finally:
        await reap(server.proc)

    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    secrets = {
        "api key": api_key,
        "api key secret": api_key.split("_", 2)[2],
        "api key tail": api_key[-12:],
        "jwt": token,
        "jwt signature": token.rsplit(".", 1)[1],
        "jwt tail": token[-12:],
    }
    for name, secret in secrets.items():
        leaks = [r for r in records if secret in json.dumps(r)]
        assert not leaks, (name, leaks[:3])
    assert any(
        r["logger"] == "chathub.auth" and r["level"] == "debug" and "Invalid header" in r["message"]
        for r in records
    ), "chathub's own debug lines are kept"
    assert any(
        r["logger"] == "uvicorn.error" and r["message"] == "Application startup complete."
        for r in records
    )
