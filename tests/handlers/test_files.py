"""``/files`` over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import zlib
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import select
from starlette.types import Message, Receive, Scope, Send

from chathub.server.app import create_app
from chathub.server.ws_protocol import uvicorn_settings
from chathub.storage.models import AuditEvent
from tests import harness
from tests.harness import RunningServer, TeamFixture, http_client, make_team, start_server


def tiny_png() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


async def upload(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    data: bytes,
    name: str = "notes.txt",
    content_type: str | None = None,
    session_id: str | None = None,
) -> httpx.Response:
    part = (name, data, content_type) if content_type else (name, data)
    form = {"session_id": session_id} if session_id is not None else None
    return await client.post("/files", files={"file": part}, data=form, headers=headers)


def blob_copies(server: RunningServer, data: bytes) -> list[Path]:
    digest = hashlib.sha256(data).hexdigest()
    return list(server.state.blobs.root.rglob(digest))


def temp_files(server: RunningServer) -> list[Path]:
    tmp = server.state.blobs.tmp_dir
    return list(tmp.iterdir()) if tmp.exists() else []


async def listed(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> list[str]:
    r = await client.get("/files", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return [f["name"] for f in r.json()["items"]]


async def test_png_round_trip_is_byte_exact_and_sniffed(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    png = tiny_png()
    r = await upload(client, h, png, name="pixel.bin", content_type="application/octet-stream")
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["content_type"] == "image/png"
    assert meta["declared_content_type"] == "application/octet-stream"
    assert meta["name"] == "pixel.bin" and meta["size"] == len(png)
    assert meta["sha256"] == hashlib.sha256(png).hexdigest()
    assert meta["uploaded_by"] == team.owner.member_id and meta["session_id"] is None
    assert r.headers["location"] == f"/files/{meta['id']}"

    got = await client.get(f"/files/{meta['id']}", headers=h)
    assert got.json() == meta

    content = await client.get(f"/files/{meta['id']}/content", headers=h)
    assert content.status_code == 200
    assert content.content == png
    assert content.headers["content-type"] == "image/png"
    assert content.headers["content-length"] == str(len(png))
    assert content.headers["etag"] == f'"{meta["sha256"]}"'
    assert content.headers["x-content-type-options"] == "nosniff"
    assert content.headers["content-disposition"].startswith("attachment;")


async def test_utf8_text_round_trip(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    text = "héllo wörld ✓\nzweite Zeile\n".encode()
    # No extension: the client can only declare application/octet-stream.
    r = await upload(client, h, text, name="README")
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == "text/plain"
    content = await client.get(f"/files/{r.json()['id']}/content", headers=h)
    assert content.content == text
    assert content.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("data", "declared", "expected"),
    [
        (b"\x00\x01\x02\xfe" * 100, None, "application/octet-stream"),
        (b"a,b\n1,2\n", "text/csv; charset=utf-8", "text/csv"),
        (b"", None, "text/plain"),
        # A declaration that is not a media type, or too long, is ignored.
        (b"plain words", "not a type", "text/plain"),
        (b"plain words", "text/" + "x" * 250, "text/plain"),
        # Sniffing beats a wrong declaration.
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "text/plain", "application/pdf"),
        # A declared text type holds only for text.
        (b"\x00\x01\x02\x03 binary declared as text", "text/plain", "application/octet-stream"),
        (b"caf\xe9 in latin-1", "text/csv", "application/octet-stream"),
        (b"\x00\x01{}", "application/json", "application/octet-stream"),
        (b'{"a": 1}', "application/json", "application/json"),
        (b"\x00\x01\x02\x03 opaque", "application/x-custom", "application/x-custom"),
    ],
)
async def test_content_type_choice(
    client: httpx.AsyncClient,
    team: TeamFixture,
    data: bytes,
    declared: str | None,
    expected: str,
) -> None:
    h = team.owner.headers
    r = await upload(client, h, data, name="blob", content_type=declared)
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == expected
    assert r.json()["size"] == len(data)
    content = await client.get(f"/files/{r.json()['id']}/content", headers=h)
    assert content.content == data


async def test_binary_declared_as_text_is_not_listed_as_text(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    r = await upload(client, h, b"\x00\x01\x02\x03" * 16, name="a.txt", content_type="text/plain")
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == "application/octet-stream"
    assert r.json()["declared_content_type"] == "text/plain"  # the claim, as made
    assert await listed(client, h, content_type="text/") == []


async def test_same_bytes_twice_make_two_files_and_one_blob(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    data = b"dedupe me " + os.urandom(32)
    a = await upload(client, h, data, name="a.txt")
    b = await upload(client, h, data, name="b.txt")
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert a.json()["sha256"] == b.json()["sha256"]
    assert sorted(await listed(client, h)) == ["a.txt", "b.txt"]
    assert len(blob_copies(clean_server, data)) == 1
    assert temp_files(clean_server) == []
    for f in (a, b):
        content = await client.get(f"/files/{f.json()['id']}/content", headers=h)
        assert content.content == data


async def test_concurrent_uploads_of_the_same_bytes(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    data = os.urandom(300_000)
    results = await asyncio.gather(*(upload(client, h, data, name=f"c{i}") for i in range(6)))
    assert [r.status_code for r in results] == [201] * 6
    assert len({r.json()["id"] for r in results}) == 6
    assert len(blob_copies(clean_server, data)) == 1
    assert temp_files(clean_server) == []
    for r in results:
        content = await client.get(f"/files/{r.json()['id']}/content", headers=h)
        assert content.content == data


async def test_large_upload_is_streamed_both_ways(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    boundary = "chathub-test-boundary"

    async def body() -> AsyncIterator[bytes]:
        # Sent chunked (no Content-Length), the file part in 64 KiB pieces.
        yield (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = await client.post(
        "/files",
        content=body(),
        headers=team.owner.headers | {"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(data)
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert temp_files(clean_server) == []

    received = bytearray()
    pieces = 0
    async with client.stream(
        "GET", f"/files/{r.json()['id']}/content", headers=team.owner.headers
    ) as response:
        assert response.headers["content-length"] == str(len(data))
        async for piece in response.aiter_raw():
            received += piece
            pieces += 1
    assert bytes(received) == data
    assert pieces > 1


async def test_session_id_must_be_a_session_of_the_team(
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
    clean_server: RunningServer,
) -> None:
    h = team.owner.headers
    mine = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    theirs = (
        await client.post("/chat/sessions", json={}, headers=other_team.owner.headers)
    ).json()["id"]

    ok = await upload(client, h, b"attached", session_id=mine)
    assert ok.status_code == 201 and ok.json()["session_id"] == mine

    for sid in (theirs, "01890000-0000-7000-8000-000000000000"):
        r = await upload(client, h, b"not attached", name="nope.txt", session_id=sid)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    deleted = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    await client.delete(f"/chat/sessions/{deleted}", headers=h)
    r = await upload(client, h, b"not attached", name="nope.txt", session_id=deleted)
    assert r.status_code == 404
    assert await listed(client, h) == ["notes.txt"]
    assert blob_copies(clean_server, b"not attached") == []
    assert temp_files(clean_server) == []


async def test_session_id_may_come_after_the_file(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="late.txt"\r\n\r\n'
        "first the file\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="session_id"\r\n\r\n'
        f"{sid}\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    r = await client.post(
        "/files",
        content=body,
        headers=h | {"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["session_id"] == sid and r.json()["name"] == "late.txt"


async def test_an_empty_session_id_field_is_no_session(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    # As an HTML form sends an optional input left empty.
    body = multipart([("session_id", None, b""), ("file", "a.txt", b"no session")])
    r = await client.post("/files", content=body, headers=team.owner.headers | MULTIPART)
    assert r.status_code == 201, r.text
    assert r.json()["session_id"] is None


async def test_a_session_id_in_upper_case_is_the_same_session(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    r = await upload(client, h, b"attached", name="upper.txt", session_id=sid.upper())
    assert r.status_code == 201, r.text
    assert r.json()["session_id"] == sid
    assert await listed(client, h, session_id=sid.upper()) == ["upper.txt"]
    assert await listed(client, h, session_id=sid) == ["upper.txt"]


async def test_pagination_newest_first_without_gaps(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    h = team.owner.headers
    made = []
    for i in range(7):
        r = await upload(client, h, f"file {i}".encode(), name=f"f{i}.txt")
        made.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/files", params=params, headers=h)
        assert r.status_code == 200
        seen += [f["id"] for f in r.json()["items"]]
        pages += 1
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(made))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"content_type": "image/png"}, {"cat.png"}),
        ({"content_type": "image/"}, {"cat.png", "dog.gif"}),
        ({"content_type": "IMAGE/*"}, {"cat.png", "dog.gif"}),
        ({"content_type": "text/plain"}, {"Notes 50%.txt", "plan.md"}),
        ({"content_type": "text/"}, {"Notes 50%.txt", "plan.md"}),
        ({"content_type": "text/pl"}, set()),
        ({"session": "yes"}, {"plan.md", "dog.gif"}),
        ({"q": "NOTES"}, {"Notes 50%.txt"}),
        ({"q": "50%"}, {"Notes 50%.txt"}),
        ({"q": "%"}, {"Notes 50%.txt"}),
        ({"q": "a"}, {"cat.png", "plan.md"}),
        ({"content_type": "image/", "session": "yes"}, {"dog.gif"}),
    ],
)
async def test_filters(
    client: httpx.AsyncClient,
    team: TeamFixture,
    params: dict[str, str],
    expected: set[str],
) -> None:
    h = team.owner.headers
    sid = (await client.post("/chat/sessions", json={}, headers=h)).json()["id"]
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00"
    assert (await upload(client, h, tiny_png(), name="cat.png")).status_code == 201
    await upload(client, h, gif, name="dog.gif", session_id=sid)
    await upload(client, h, b"remember", name="Notes 50%.txt")
    await upload(
        client, h, b"1. ship it", name="plan.md", content_type="text/plain", session_id=sid
    )
    query = {k: v for k, v in params.items() if k != "session"}
    if "session" in params:
        query["session_id"] = sid
    assert set(await listed(client, h, **query)) == expected


async def test_unknown_session_filter_lists_nothing(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    await upload(client, team.owner.headers, b"x")
    assert await listed(client, team.owner.headers, session_id="nope") == []


@pytest.mark.parametrize("value", ["image", "/png", "image/png/x", "ima ge/png", "*/*"])
async def test_bad_content_type_filter(
    client: httpx.AsyncClient, team: TeamFixture, value: str
) -> None:
    r = await client.get("/files", params={"content_type": value}, headers=team.owner.headers)
    assert r.status_code == 400 and r.json()["code"] == "bad_request"


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xyz") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": "multipart/form-data; boundary=xyz"}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(
            multipart([("session_id", None, b"01890000-0000-7000-8000-000000000000")]),
            MULTIPART,
            id="no-file-part",
        ),
        pytest.param(multipart([]), MULTIPART, id="no-parts"),
        pytest.param(
            multipart([("file", "a.txt", b"hi"), ("session_id", None, b"not-an-id")]),
            MULTIPART,
            id="session-id-not-an-id",
        ),
        pytest.param(
            multipart([("session_id", None, b"x" * 500), ("file", "a.txt", b"hi")]),
            MULTIPART,
            id="session-id-long",
        ),
        pytest.param(
            multipart([("file", "a.txt", b"hi"), ("title", None, b"x")]),
            MULTIPART,
            id="unknown-field",
        ),
        pytest.param(
            multipart([("file", "a.txt", b"hi"), ("file", "b.txt", b"ho")]),
            MULTIPART,
            id="two-files",
        ),
        pytest.param(b'{"file": "hi"}', {"content-type": "application/json"}, id="json"),
        pytest.param(
            b"file=hi", {"content-type": "application/x-www-form-urlencoded"}, id="urlencoded"
        ),
        pytest.param(
            multipart([("file", "a.txt", b"hi")]),
            {"content-type": "multipart/form-data"},
            id="no-boundary",
        ),
        pytest.param(multipart([("file", "a.txt", b"hi")])[:-10], MULTIPART, id="truncated"),
        pytest.param(b"", MULTIPART, id="empty-body"),
        pytest.param(b"garbage without any boundary", MULTIPART, id="garbage"),
    ],
)
async def test_bad_uploads_are_400_and_write_nothing(
    client: httpx.AsyncClient,
    team: TeamFixture,
    clean_server: RunningServer,
    body: bytes,
    headers: dict[str, str],
) -> None:
    h = team.owner.headers
    r = await client.post("/files", content=body, headers=h | headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "bad_request"
    assert await listed(client, h) == []
    assert temp_files(clean_server) == []
    assert blob_copies(clean_server, b"hi") == []


async def test_viewer_reads_but_cannot_upload_or_delete(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    viewer = await team.actor("viewer")
    member = await team.actor("member")
    r = await upload(client, viewer.headers, b"from a viewer")
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    made = await upload(client, member.headers, b"from a member")
    assert made.status_code == 201
    fid = made.json()["id"]
    assert (await client.get(f"/files/{fid}", headers=viewer.headers)).status_code == 200
    content = await client.get(f"/files/{fid}/content", headers=viewer.headers)
    assert content.content == b"from a member"
    assert await listed(client, viewer.headers) == ["notes.txt"]
    r = await client.delete(f"/files/{fid}", headers=viewer.headers)
    assert r.status_code == 403
    assert (await client.get(f"/files/{fid}", headers=viewer.headers)).status_code == 200


async def test_no_credentials_is_401(client: httpx.AsyncClient) -> None:
    r = await client.post("/files", files={"file": ("a.txt", b"hi")})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert (await client.get("/files")).status_code == 401


async def test_other_teams_files_are_404(
    client: httpx.AsyncClient, team: TeamFixture, other_team: TeamFixture
) -> None:
    theirs = await upload(client, other_team.owner.headers, b"secret plans", name="plans.txt")
    fid = theirs.json()["id"]
    h = team.owner.headers
    for path in (f"/files/{fid}", f"/files/{fid}/content"):
        r = await client.get(path, headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert (await client.delete(f"/files/{fid}", headers=h)).status_code == 404
    assert await listed(client, h) == []
    # Still there for its own team.
    r = await client.get(f"/files/{fid}/content", headers=other_team.owner.headers)
    assert r.content == b"secret plans"


async def test_soft_delete(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    h = team.owner.headers
    data = b"short-lived " + os.urandom(16)
    fid = (await upload(client, h, data, name="gone.txt")).json()["id"]
    keep = (await upload(client, h, b"stays", name="kept.txt")).json()["id"]
    r = await client.delete(f"/files/{fid}", headers=h)
    assert r.status_code == 204 and r.content == b""
    for path in (f"/files/{fid}", f"/files/{fid}/content"):
        assert (await client.get(path, headers=h)).status_code == 404
    assert (await client.delete(f"/files/{fid}", headers=h)).status_code == 404
    assert await listed(client, h) == ["kept.txt"]
    assert blob_copies(clean_server, data) == []  # no other file had these bytes
    assert (await client.get(f"/files/{keep}/content", headers=h)).content == b"stays"

    async with clean_server.state.sessionmaker() as db:
        events = (
            await db.scalars(
                select(AuditEvent)
                .where(AuditEvent.team_id == team.team_id, AuditEvent.target_id == fid)
                .order_by(AuditEvent.id)
            )
        ).all()
    assert [(e.action, e.actor_id) for e in events] == [
        ("file.upload", team.owner.member_id),
        ("file.delete", team.owner.member_id),
    ]


async def test_shared_bytes_survive_until_the_last_file_goes(
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
    clean_server: RunningServer,
) -> None:
    data = b"common knowledge " + os.urandom(16)
    a = (await upload(client, team.owner.headers, data)).json()["id"]
    b = (await upload(client, team.owner.headers, data)).json()["id"]
    c = (await upload(client, other_team.owner.headers, data)).json()["id"]
    assert len(blob_copies(clean_server, data)) == 1

    assert (await client.delete(f"/files/{a}", headers=team.owner.headers)).status_code == 204
    assert (await client.delete(f"/files/{b}", headers=team.owner.headers)).status_code == 204
    # The other team's file still has its bytes.
    r = await client.get(f"/files/{c}/content", headers=other_team.owner.headers)
    assert r.content == data
    await client.delete(f"/files/{c}", headers=other_team.owner.headers)
    assert blob_copies(clean_server, data) == []

    # Uploading the same bytes again stores them again.
    d = (await upload(client, team.owner.headers, data)).json()["id"]
    assert (await client.get(f"/files/{d}/content", headers=team.owner.headers)).content == data


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("Résumé 東京 2024.txt", "Résumé 東京 2024.txt"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("..", "upload"),
        ("x" * 300 + ".txt", "x" * 251 + ".txt"),
    ],
)
async def test_names_are_sanitised_and_downloaded_intact(
    client: httpx.AsyncClient, team: TeamFixture, sent: str, stored: str
) -> None:
    h = team.owner.headers
    r = await upload(client, h, b"content", name=sent, content_type="text/plain")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == stored
    content = await client.get(f"/files/{r.json()['id']}/content", headers=h)
    disposition = content.headers["content-disposition"]
    assert disposition.isascii()
    assert disposition.startswith('attachment; filename="')
    encoded = disposition.split("filename*=", 1)[1]
    assert encoded.startswith("UTF-8''")
    assert unquote(encoded.removeprefix("UTF-8''"), errors="strict") == stored


async def test_control_characters_are_dropped_from_names(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    # Sent raw (httpx would percent-encode them as browsers do).
    body = multipart([("file", "tab\there\x07 \x1b[31mred.txt", b"x")])
    r = await client.post("/files", content=body, headers=team.owner.headers | MULTIPART)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "tabhere [31mred.txt"


async def test_etag_revalidation_and_ranges(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    data = bytes(range(256)) * 10
    meta = (await upload(client, h, data, name="bytes.bin")).json()
    url = f"/files/{meta['id']}/content"
    etag = (await client.get(url, headers=h)).headers["etag"]
    r = await client.get(url, headers=h | {"if-none-match": etag})
    assert r.status_code == 304 and r.content == b""
    r = await client.get(url, headers=h | {"if-none-match": '"something-else"'})
    assert r.status_code == 200 and r.content == data
    r = await client.get(url, headers=h | {"range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]


async def test_last_modified_is_the_files_own_date(
    client: httpx.AsyncClient,
    team: TeamFixture,
    other_team: TeamFixture,
    clean_server: RunningServer,
) -> None:
    """The bytes are shared with another team's file, stored (as if) long
    before: nothing of that shows, If-Range by date included."""
    long_ago = 946_684_800  # 2000-01-01
    data = b"the same memo " + os.urandom(16)
    assert (await upload(client, other_team.owner.headers, data)).status_code == 201
    (blob,) = blob_copies(clean_server, data)
    os.utime(blob, (long_ago, long_ago))
    h = team.owner.headers
    mine = (await upload(client, h, data)).json()
    url = f"/files/{mine['id']}/content"

    r = await client.get(url, headers=h)
    created = datetime.fromisoformat(mine["created_at"]).timestamp()
    assert r.headers["last-modified"] == formatdate(created, usegmt=True)
    ranged = h | {"range": "bytes=0-3"}
    r = await client.get(url, headers=ranged | {"if-range": r.headers["last-modified"]})
    assert r.status_code == 206 and r.content == data[:4]
    r = await client.get(url, headers=ranged | {"if-range": formatdate(long_ago, usegmt=True)})
    assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("bytes=abc", 400),
        ("items=0-1", 400),
        ("bytes=5-1", 400),
        ("bytes", 400),
        ("bytes=2560-", 416),
        ("bytes=100000-100010", 416),
    ],
)
async def test_bad_ranges_are_problems(
    client: httpx.AsyncClient, team: TeamFixture, value: str, status: int
) -> None:
    h = team.owner.headers
    meta = (await upload(client, h, bytes(range(256)) * 10, name="bytes.bin")).json()
    r = await client.get(f"/files/{meta['id']}/content", headers=h | {"range": value})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "bad_request" and r.json()["status"] == status
    assert "Range" in r.json()["detail"]
    if status == 416:
        assert r.headers["content-range"] == "bytes */2560"


async def test_good_ranges_and_head(client: httpx.AsyncClient, team: TeamFixture) -> None:
    h = team.owner.headers
    data = bytes(range(256)) * 10
    url = f"/files/{(await upload(client, h, data, name='bytes.bin')).json()['id']}/content"
    r = await client.get(url, headers=h | {"range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    assert r.headers["content-range"] == "bytes 2555-2559/2560"
    r = await client.get(url, headers=h | {"range": "bytes=2550-99999"})
    assert r.status_code == 206 and r.content == data[2550:]
    r = await client.get(url, headers=h | {"range": "bytes=0-1,10-11"})
    assert r.status_code == 206 and r.headers["content-type"].startswith("multipart/byteranges")
    head = await client.head(url, headers=h)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "2560" and head.headers["etag"]
    head = await client.head(url, headers=h | {"range": "bytes=10-19"})
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-range"] == "bytes 10-19/2560"


async def test_a_blob_removed_once_the_headers_are_sent_still_downloads_whole(
    tmp_path: Path,
) -> None:
    """The worst moment for a delete of the last file with these bytes: the
    handler is done and the status line is on its way. A server of its own,
    whose transport removes the blob right after ``http.response.start``."""
    settings = harness.test_settings(f"sqlite+aiosqlite:///{tmp_path / 'chathub.db'}", tmp_path)
    app = create_app(settings)
    doomed: list[Path] = []

    async def remove_blob_after_start(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and doomed:
                doomed.pop().unlink()

        await app(scope, receive, sending if scope["type"] == "http" else send)

    server, task, port = await harness.serve(
        remove_blob_after_start, lifespan="on", **uvicorn_settings(settings)
    )
    running = RunningServer(settings, port, app.state.chathub, server, task)
    try:
        h = (await make_team(running.state)).owner.headers
        async with http_client(running) as client:
            for extra, status, part in [
                ({}, 200, slice(None)),
                ({"range": "bytes=100-199"}, 206, slice(100, 200)),
                ({"range": "bytes=0-9,-10"}, 206, None),
            ]:
                data = os.urandom(300_000)
                fid = (await upload(client, h, data, name="racy.bin")).json()["id"]
                doomed[:] = blob_copies(running, data)
                r = await client.get(f"/files/{fid}/content", headers=h | extra)
                assert r.status_code == status
                if part is None:  # multipart/byteranges
                    assert data[:10] in r.content and data[-10:] in r.content
                else:
                    assert r.content == data[part]
                assert doomed == [], "the blob was not removed"
                # Later requests find the blob gone: a 404, before any header.
                r = await client.get(f"/files/{fid}/content", headers=h)
                assert r.status_code == 404 and r.json()["code"] == "not_found"
    finally:
        await running.stop()


async def test_size_limit(tmp_path: Path) -> None:
    """A server of its own with ``max_file_bytes=1024``."""
    running = await start_server(
        harness.test_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'chathub.db'}", tmp_path, max_file_bytes=1024
        )
    )
    try:
        team = await make_team(running.state)
        h = team.owner.headers
        async with http_client(running) as client:
            at_limit = os.urandom(1024)
            r = await upload(client, h, at_limit, name="fits.bin")
            assert r.status_code == 201, r.text
            assert r.json()["size"] == 1024

            async def chunked(data: bytes) -> AsyncIterator[bytes]:
                head, tail = multipart([("file", "big.bin", data)]).split(data)
                yield head
                for i in range(0, len(data), 4096):
                    await asyncio.sleep(0)
                    yield data[i : i + 4096]
                yield tail

            over = [os.urandom(1025), os.urandom(30_000)]
            for data in over:
                r = await upload(client, h, data, name="too-big.bin")
                assert r.status_code == 413, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["code"] == "too_large"
                r = await client.post("/files", content=chunked(data), headers=h | MULTIPART)
                assert r.status_code == 413 and r.json()["code"] == "too_large"

            # Far over: the server's body limit answers from Content-Length
            # alone, before reading; a client that is still sending (httpx)
            # may see the connection close instead of the 413.
            huge = os.urandom(2 * 1024 * 1024)
            over.append(huge)
            try:
                r = await upload(client, h, huge, name="huge.bin")
            except httpx.TransportError:
                pass
            else:
                assert r.status_code == 413

            assert await listed(client, h) == ["fits.bin"]
            assert len(blob_copies(running, at_limit)) == 1
            for data in over:
                assert blob_copies(running, data) == []
            assert temp_files(running) == []
            # The server is fine afterwards.
            r = await upload(client, h, b"small", name="after.txt")
            assert r.status_code == 201
    finally:
        await running.stop()


async def test_a_client_that_goes_away_mid_upload_leaves_nothing(
    client: httpx.AsyncClient, team: TeamFixture, clean_server: RunningServer
) -> None:
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="partial.bin"\r\n\r\n'
    _reader, writer = await asyncio.open_connection("127.0.0.1", clean_server.port)
    request = (
        "POST /files HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{clean_server.port}\r\n"
        f"Authorization: {team.owner.headers['Authorization']}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {len(head) + 1_000_000}\r\n\r\n"
    ).encode()
    writer.write(request + head + os.urandom(300_000))
    await writer.drain()
    for _ in range(500):  # until the server is writing the upload to disk
        if temp_files(clean_server):
            break
        await asyncio.sleep(0.01)
    assert temp_files(clean_server), "the upload never started"
    writer.close()
    await writer.wait_closed()
    for _ in range(500):
        if not temp_files(clean_server):
            break
        await asyncio.sleep(0.01)
    assert temp_files(clean_server) == []
    assert await listed(client, team.owner.headers) == []
