"""What one member can make an instance hold: open sockets (capped per
member, the next closed with 4429), sessions created and bytes uploaded per
minute (the rate limiter messages use, refused with 429 ``rate_limited``).
Real HTTP and real sockets against a running server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.harness import RunningServer, make_team, replicas, server_on
from tests.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

CAP = 3
ANSWER_TIMEOUT_S = 15.0


async def refused_socket(
    srv: RunningServer, token: str, *, first_frame_auth: bool = False
) -> tuple[int | None, str | None, list[dict[str, Any]]]:
    """Open a socket as ``token`` and read until the server closes it: the
    close code, its reason and the frames that came before."""
    headers = {} if first_frame_auth else {"Authorization": f"Bearer {token}"}
    conn = await websockets.connect(srv.ws_url, additional_headers=headers)
    frames: list[dict[str, Any]] = []
    try:
        if first_frame_auth:
            await conn.send(json.dumps({"type": "auth", "token": token, "id": "a1"}))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                while True:
                    frames.append(json.loads(await conn.recv()))
    finally:
        await conn.close()
    return conn.close_code, conn.close_reason, frames


async def cap_closes(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("chathub_socket_cap_closes_total "):
            return float(line.split()[1])
    return 0.0


@contextlib.asynccontextmanager
async def server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    async with server_on("sqlite", tmp_path, **overrides) as running:
        yield running


# --- sockets ----------------------------------------------------------------


async def test_a_member_past_the_socket_cap_is_closed_4429_before_the_welcome(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, ws_max_per_member=CAP) as srv:
        team = await make_team(srv.state)
        other = await team.actor("member")
        async with httpx.AsyncClient(base_url=srv.url) as http:
            before = await cap_closes(http)
            open_ = [await WsClient.connect(srv.ws_url, team.owner.api_key) for _ in range(CAP)]
            assert all(ws.welcome["type"] == "welcome" for ws in open_)
            # header auth and first-frame auth alike: closed, and no welcome
            for first_frame_auth in (False, True):
                code, reason, frames = await refused_socket(
                    srv, team.owner.api_key, first_frame_auth=first_frame_auth
                )
                assert (code, reason, frames) == (4429, "too many sockets", [])
            assert await cap_closes(http) == before + 2
            # per member: a teammate is not affected
            teammate = await WsClient.connect(srv.ws_url, other.api_key)
            # the sockets within the cap are untouched
            for ws in open_:
                assert (await ws.request({"type": "ping"}))["type"] == "pong"
            # a closed socket frees its slot at once
            await open_.pop().close()
            again = await WsClient.connect(srv.ws_url, team.owner.api_key)
            assert again.welcome["type"] == "welcome"
            code, _, _ = await refused_socket(srv, team.owner.api_key)
            assert code == 4429
            for ws in [*open_, again, teammate]:
                await ws.close()


async def test_sockets_authenticating_at_once_cannot_pass_the_cap_together(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, ws_max_per_member=CAP) as srv:
        team = await make_team(srv.state)

        async def attempt() -> WsClient | int | None:
            try:
                return await WsClient.connect(srv.ws_url, team.owner.api_key)
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None

        results = await asyncio.gather(*(attempt() for _ in range(4 * CAP)))
        welcomed = [r for r in results if isinstance(r, WsClient)]
        assert len(welcomed) == CAP
        assert [r for r in results if not isinstance(r, WsClient)] == [4429] * (3 * CAP)
        for ws in welcomed:
            await ws.close()


# --- sessions ---------------------------------------------------------------


async def test_session_creation_past_the_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    async with server(tmp_path, rate_user_sessions=3) as srv:
        team = await make_team(srv.state)
        other = await team.actor("member")
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for _ in range(3):
                r = await http.post("/chat/sessions", json={}, headers=h)
                assert r.status_code == 201, r.text
            r = await http.post("/chat/sessions", json={"title": "one more"}, headers=h)
            assert r.status_code == 429, r.text
            assert r.headers["content-type"] == "application/problem+json"
            body = r.json()
            assert body["code"] == "rate_limited" and "sessions" in body["detail"]
            # one session comes back every 20 s
            assert 15 < body["retry_after_s"] <= 20
            assert int(r.headers["Retry-After"]) == round(body["retry_after_s"])
            # per member; and the refused one was not created
            r = await http.post("/chat/sessions", json={}, headers=other.headers)
            assert r.status_code == 201, r.text
            listed = (await http.get("/chat/sessions", headers=h)).json()["items"]
            assert len(listed) == 4 and "one more" not in [s["title"] for s in listed]


async def test_the_session_limit_is_shared_between_replicas(tmp_path: Path) -> None:
    async with replicas(tmp_path, rate_user_sessions=2) as (a, b):
        team = await make_team(a.state)
        h = team.owner.headers
        async with httpx.AsyncClient() as http:
            for srv in (a, b):
                r = await http.post(f"{srv.url}/chat/sessions", json={}, headers=h)
                assert r.status_code == 201, r.text
            for srv in (a, b):
                r = await http.post(f"{srv.url}/chat/sessions", json={}, headers=h)
                assert r.status_code == 429, r.text
                assert r.json()["retry_after_s"] > 0


# --- uploads ----------------------------------------------------------------

BOUNDARY = "abuse-limits-boundary"


def multipart(data: bytes, name: str = "f.bin") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


UPLOAD_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


async def upload(
    http: httpx.AsyncClient, headers: dict[str, str], size: int, *, chunked: bool = False
) -> httpx.Response:
    """Upload ``size`` fresh random bytes, with a Content-Length or chunked."""
    body = multipart(secrets.token_bytes(size))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    return await http.post(
        "/files",
        content=pieces() if chunked else body,
        headers={**headers, "Content-Type": UPLOAD_TYPE},
    )


def assert_rate_limited(r: httpx.Response, low: float, high: float) -> None:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == "rate_limited" and "upload bytes" in body["detail"], body
    assert low < body["retry_after_s"] <= high, body
    assert int(r.headers["Retry-After"]) == max(1, round(body["retry_after_s"]))


def stored_blobs(srv: RunningServer) -> list[Path]:
    return [p for p in srv.settings.blob_dir.rglob("*") if p.is_file()]


async def test_uploads_past_the_limit_are_refused_by_their_declared_size(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, rate_user_upload_bytes=100_000) as srv:
        team = await make_team(srv.state)
        other = await team.actor("member")
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await upload(http, h, 60_000)
            assert r.status_code == 201, r.text
            blobs = stored_blobs(srv)
            # 60 KB of 100 KB a minute are taken: 60 KB more wait ~12 s
            assert_rate_limited(await upload(http, h, 60_000), 10, 13)
            assert (await upload(http, h, 30_000)).status_code == 201  # what fits passes
            # per member
            assert (await upload(http, other.headers, 60_000)).status_code == 201
            files = (await http.get("/files", headers=h)).json()["items"]
            assert len(files) == 3
        assert len(stored_blobs(srv)) == len(blobs) + 2


async def test_an_upload_over_the_limit_is_answered_before_its_body_is_read(
    tmp_path: Path,
) -> None:
    """The 429 comes while the client has sent only the request's head;
    the body, sent afterwards, is read and dropped, and the connection
    closes without a reset."""
    async with server(tmp_path, rate_user_upload_bytes=100_000) as srv:
        team = await make_team(srv.state)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await upload(http, team.owner.headers, 90_000)).status_code == 201
        blobs = stored_blobs(srv)
        body = multipart(secrets.token_bytes(500_000))
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            head = (
                f"POST /files HTTP/1.1\r\nHost: test\r\n"
                f"Authorization: Bearer {team.owner.api_key}\r\n"
                f"Content-Type: {UPLOAD_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode())
            await writer.drain()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                raw = await reader.readuntil(b"\r\n\r\n")
                status_line, *lines = raw.decode("latin-1").split("\r\n")
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in lines if line)
                )
                answer = json.loads(await reader.readexactly(int(headers["content-length"])))
            assert int(status_line.split()[1]) == 429, answer
            assert answer["code"] == "rate_limited" and answer["retry_after_s"] > 0
            assert headers["retry-after"] and headers["connection"] == "close"
            for start in range(0, len(body), 64 * 1024):
                writer.write(body[start : start + 64 * 1024])
                await writer.drain()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                assert await reader.read() == b""  # closed once read, not reset
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert stored_blobs(srv) == blobs


async def test_a_chunked_upload_is_charged_its_stored_size_even_past_the_limit(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, rate_user_upload_bytes=100_000) as srv:
        team = await make_team(srv.state)
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await upload(http, h, 150_000, chunked=True)
            assert r.status_code == 201, r.text
            assert r.json()["size"] == 150_000
            # 50 KB owed past the limit: any upload waits until it is paid (30 s)
            assert_rate_limited(await upload(http, h, 10, chunked=True), 25, 31)
            assert_rate_limited(await upload(http, h, 10), 25, 31)
            assert len((await http.get("/files", headers=h)).json()["items"]) == 1


async def test_one_upload_larger_than_the_limit_passes_on_a_full_bucket(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, rate_user_upload_bytes=50_000) as srv:
        team = await make_team(srv.state)
        h = team.owner.headers
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await upload(http, h, 200_000)
            assert r.status_code == 201, r.text
            # it spent the whole bucket (and only that): half of it takes 30 s to come back
            assert_rate_limited(await upload(http, h, 25_000), 29, 31)


async def test_the_team_upload_limit_holds_with_the_member_limit_off(tmp_path: Path) -> None:
    async with server(tmp_path, rate_user_upload_bytes=0, rate_team_upload_bytes=100_000) as srv:
        team = await make_team(srv.state)
        other_team = await make_team(srv.state, "Globex")
        member = await team.actor("member")
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await upload(http, team.owner.headers, 60_000)).status_code == 201
            assert_rate_limited(await upload(http, member.headers, 60_000), 10, 13)
            assert (await upload(http, other_team.owner.headers, 60_000)).status_code == 201


# --- off --------------------------------------------------------------------


async def test_limits_at_zero_are_off(tmp_path: Path) -> None:
    """Past each default (50 sockets, 60 sessions a minute) and past what
    a small upload limit would allow."""
    async with server(
        tmp_path,
        ws_max_per_member=0,
        rate_user_sessions=0,
        rate_user_upload_bytes=0,
        rate_team_upload_bytes=0,
        max_file_bytes=2_000_000,
    ) as srv:
        assert srv.settings.ws_max_per_member == 0  # the setting exists and is read
        team = await make_team(srv.state)
        h = team.owner.headers
        sockets = await asyncio.gather(
            *(WsClient.connect(srv.ws_url, team.owner.api_key) for _ in range(60))
        )
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            for _ in range(65):
                r = await http.post("/chat/sessions", json={}, headers=h)
                assert r.status_code == 201, r.text
            for chunked in (False, True, False):
                r = await upload(http, h, 1_500_000, chunked=chunked)
                assert r.status_code == 201, r.text
        for ws in sockets:
            await ws.close()
