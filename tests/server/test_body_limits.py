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

from chathub.server import input_checks, limits
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


async def expect_408(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, says: str) -> None:
    """The answer is a 408 problem whose detail says ``says``, and the
    server closes the connection after it."""
    try:
        status, headers, body = await read_answer(reader)
        assert await reader.read() == b""  # and the connection is closed
    finally:
        await close(writer)
    assert status == 408, body
    assert headers["content-type"] == "application/problem+json"
    assert body["code"] == "bad_request" and says in body["detail"], body


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
    await expect_408(reader, writer, "did not arrive")


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


def multipart_head(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


async def test_an_upload_that_stalls_is_answered_408_and_stores_nothing(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "BODY_IDLE_TIMEOUT_S", 0.5, raising=False)
    team = await make_team(srv.state, "Stalled")
    boundary = "stalled-upload"
    reader, writer = await open_request(
        srv,
        "/files",
        {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(1024 * 1024),
            "Authorization": team.owner.headers["Authorization"],
        },
        multipart_head(boundary) + b"x" * 64 * 1024,
    )
    await expect_408(reader, writer, "stalled")
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        listed = await http.get("/files", headers=team.owner.headers)
    assert listed.status_code == 200 and listed.json()["items"] == [], listed.text


async def test_a_slow_upload_that_keeps_moving_is_stored(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is on a pause, not on the whole body: pieces every 0.2 s
    for 1.6 s, past a 0.5 s limit in all."""
    monkeypatch.setattr(limits, "BODY_IDLE_TIMEOUT_S", 0.5, raising=False)
    team = await make_team(srv.state, "Slow")
    boundary = "slow-upload"
    pieces = [bytes([i]) * 1024 for i in range(8)]
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(multipart_head(boundary)) + sum(map(len, pieces)) + len(tail)
    reader, writer = await open_request(
        srv,
        "/files",
        {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(length),
            "Authorization": team.owner.headers["Authorization"],
        },
        multipart_head(boundary),
    )
    try:
        for piece in pieces:
            await asyncio.sleep(0.2)
            writer.write(piece)
            await writer.drain()
        writer.write(tail)
        await writer.drain()
        status, _, body = await read_answer(reader)
    finally:
        await close(writer)
    assert status == 201, body
    assert body["size"] == 8 * 1024


async def test_a_server_sent_event_stream_outlasts_the_body_pause_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the body is in, the server waits for the client's disconnect
    without a limit: a reply streamed over 1.5 s reaches its end."""
    monkeypatch.setattr(limits, "BODY_IDLE_TIMEOUT_S", 0.5, raising=False)
    text = "y" * 30
    async with server_on(
        "sqlite", tmp_path, llm=f"scripted://?text={text}&chunk=2&rate=10"
    ) as slow:
        team = await make_team(slow.state, "Streams")
        async with httpx.AsyncClient(base_url=slow.url, timeout=30) as http:
            r = await http.post("/chat/sessions", json={"title": "t"}, headers=team.owner.headers)
            sid = r.json()["id"]
            async with http.stream(
                "POST",
                f"/chat/sessions/{sid}/messages",
                json={"content": "hi"},
                headers=team.owner.headers | {"Accept": "text/event-stream"},
            ) as stream:
                assert stream.status_code == 200
                events = [
                    json.loads(line.removeprefix("data: "))
                    async for line in stream.aiter_lines()
                    if line.startswith("data: ")
                ]
    deltas = "".join(e["text"] for e in events if e["type"] == "reply.delta")
    assert events[-1]["type"] == "reply.completed", events[-1]
    assert deltas == text
