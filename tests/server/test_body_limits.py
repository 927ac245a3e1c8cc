"""What an unauthenticated client can make the server hold: a JSON body is
read (before routing and authentication) up to the JSON limit on every path,
``/files`` included, and no longer than the input checks' time limit. Real
HTTP over a raw socket, so that the client decides how much it sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chathub.server import input_checks
from tests.harness import RunningServer, make_team, server_on

pytestmark = pytest.mark.timeout(60)

JSON_LIMIT = 64 * 1024
FILE_LIMIT = 4 * 1024 * 1024
ANSWER_TIMEOUT_S = 15.0
"""Generous: the answers expected here come at once, or never."""


@pytest.fixture(scope="module")
async def srv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    data_dir: Path = tmp_path_factory.mktemp("body-limits")
    async with server_on(
        "sqlite", data_dir, max_body_bytes=JSON_LIMIT, max_file_bytes=FILE_LIMIT
    ) as running:
        yield running


async def open_request(
    srv: RunningServer, path: str, headers: dict[str, str], first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a POST's head and the first bytes of its body, and no more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(head.encode() + b"\r\n" + first)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """The response's status, headers and JSON body."""
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, json.loads(body)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.parametrize("path", ["/files", "/chat/sessions"])
async def test_a_json_body_declared_past_the_json_limit_is_refused_before_it_is_sent(
    srv: RunningServer, path: str
) -> None:
    """Within the upload limit of /files, but JSON: 413 while the client has
    sent a fraction of it (the server does not wait for the rest)."""
    declared = 2 * 1024 * 1024
    assert JSON_LIMIT < declared < FILE_LIMIT
    reader, writer = await open_request(
        srv,
        path,
        {"Content-Type": "application/json", "Content-Length": str(declared)},
        b'{"a": "' + b"x" * 16 * 1024,
    )
    try:
        status, headers, body = await read_answer(reader)
    finally:
        await close(writer)
    assert status == 413, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert body["code"] == "too_large" and str(JSON_LIMIT) in body["detail"], body


async def test_a_chunked_json_body_is_refused_once_past_the_json_limit(
    srv: RunningServer,
) -> None:
    """No length declared: refused as soon as what arrived is past the
    limit, before the body ends."""
    chunk = b"x" * 16 * 1024
    first = b'{"a": "'
    sent = b"%x\r\n%s\r\n" % (len(first), first)
    sent += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6))  # 96 KiB
    reader, writer = await open_request(
        srv,
        "/files",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        sent,
    )
    try:
        status, _, body = await read_answer(reader)
    finally:
        await close(writer)
    assert status == 413 and body["code"] == "too_large", body


@pytest.mark.parametrize("path", ["/files", "/chat/sessions"])
async def test_a_stalled_json_body_is_answered_408(
    srv: RunningServer, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # raising=False: the same test runs against a build without the limit
    monkeypatch.setattr(input_checks, "JSON_BODY_TIMEOUT_S", 0.5, raising=False)
    reader, writer = await open_request(
        srv, path, {"Content-Type": "application/json", "Content-Length": "100"}, b'{"a": '
    )
    try:
        status, headers, body = await read_answer(reader)
        assert await reader.read() == b""  # and the connection is closed
    finally:
        await close(writer)
    assert status == 408, body
    assert headers["content-type"] == "application/problem+json"
    assert body["code"] == "bad_request" and "did not arrive" in body["detail"], body


async def test_uploads_keep_the_upload_limit_and_json_below_the_limit_goes_on(
    srv: RunningServer,
) -> None:
    """The multipart upload past the JSON limit is stored; JSON within the
    limit reaches the route (here: its authentication)."""
    team = await make_team(srv.state, "Limits")
    data = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB: past JSON, within files
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        r = await http.post("/files", files={"file": ("big.bin", data)}, headers=team.owner.headers)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == len(data)
        r = await http.post("/files", json={"a": "x" * 1024})
        assert r.status_code == 401, r.text
        r = await http.post("/chat/sessions", json={"title": "t"}, headers=team.owner.headers)
        assert r.status_code == 201, r.text


async def test_a_refused_json_upload_is_read_to_its_end_not_reset(srv: RunningServer) -> None:
    """A JSON body on /files within the upload limit (a proxy in front lets
    it through) is refused at once, then read to its end: a proxy still
    sending it gets the 413, not a reset it would count as the server
    failing."""
    body = b'{"a": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    assert JSON_LIMIT < len(body) < FILE_LIMIT
    reader, writer = await open_request(
        srv,
        "/files",
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
        b"",
    )
    try:
        status, _, answer = await read_answer(reader)
        piece = 64 * 1024
        for start in range(0, len(body), piece):  # the rest, as a slow proxy sends it
            writer.write(body[start : start + piece])
            await writer.drain()
            await asyncio.sleep(0.005)
        assert await reader.read() == b""  # then the server closes, having read it all
    finally:
        await close(writer)
    assert status == 413 and answer["code"] == "too_large", answer
