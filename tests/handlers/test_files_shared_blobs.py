"""Deduplicated blobs shared by several server processes (replicas, or
``--workers N``) on one PostgreSQL database and one blob store: an upload of
bytes already stored and the delete of the last other file with them must
not interleave, or the new file is left without its bytes.

In the first two tests the other process is the test itself, holding the
blob's lock in a transaction of its own as the contract between processes
says (``pg_advisory_xact_lock(hashtextextended('chathub:blob:' || sha256,
0))``), at the critical point of an upload or of a delete. The last one
races two app instances, each with its own in-process locks, on one data
directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from chathub.server.state import AppState
from chathub.storage.db import transaction
from chathub.storage.repositories import files as files_repo
from tests import harness
from tests.handlers.test_files import upload
from tests.harness import http_client, make_team, server_on, start_server

pytestmark = [pytest.mark.postgres]

BLOB_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('chathub:blob:' || :sha, 0))")
LOCK_WAITERS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def waits_or_ends(state: AppState, task: asyncio.Task[httpx.Response]) -> None:
    """Until ``task`` has ended or someone waits for an advisory lock."""
    async with state.sessionmaker() as db:
        for _ in range(1000):
            if task.done() or await db.scalar(LOCK_WAITERS):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the request neither ended nor waited for a lock")


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_an_upload_waits_for_the_collector_of_its_bytes(tmp_path: Path) -> None:
    async with server_on("postgres", tmp_path) as server:
        state = server.state
        h = (await make_team(state)).owner.headers
        data = os.urandom(100_000)
        sha = hashlib.sha256(data).hexdigest()
        # Another process is deleting the last file with these bytes: it has
        # found no live reference to the blob, which is still in place.
        await state.blobs.write_stream(one_chunk(data), max_bytes=len(data))
        async with http_client(server) as client:
            async with transaction(state.sessionmaker) as collector:
                await collector.execute(BLOB_LOCK, {"sha": sha})
                uploading = asyncio.create_task(upload(client, h, data))
                await waits_or_ends(state, uploading)
                await state.blobs.delete(sha)
            r = await uploading
            assert r.status_code == 201, r.text
            content = await client.get(f"/files/{r.json()['id']}/content", headers=h)
            assert content.status_code == 200, content.text
            assert content.content == data


async def test_a_collector_waits_for_an_upload_of_its_bytes(tmp_path: Path) -> None:
    async with server_on("postgres", tmp_path) as server:
        state = server.state
        team = await make_team(state)
        h = team.owner.headers
        data = os.urandom(100_000)
        sha = hashlib.sha256(data).hexdigest()
        async with http_client(server) as client:
            first = (await upload(client, h, data, name="first.bin")).json()["id"]
            # Another process is uploading the same bytes: it has found the
            # blob in place (so kept no copy of its own), and has not yet
            # committed its row.
            async with transaction(state.sessionmaker) as uploader:
                await uploader.execute(BLOB_LOCK, {"sha": sha})
                second = await files_repo.create_file(
                    uploader,
                    team_id=team.team_id,
                    name="second.bin",
                    size=len(data),
                    content_type="application/octet-stream",
                    declared_content_type=None,
                    sha256=sha,
                    uploaded_by=None,
                    session_id=None,
                )
                deleting = asyncio.create_task(client.delete(f"/files/{first}", headers=h))
                await waits_or_ends(state, deleting)
            assert (await deleting).status_code == 204
            content = await client.get(f"/files/{second.id}/content", headers=h)
            assert content.status_code == 200, content.text
            assert content.content == data


@pytest.mark.timeout(180)
async def test_two_instances_racing_upload_and_delete_keep_every_upload(tmp_path: Path) -> None:
    """On instance A, a file of bytes X; then at once on B an upload of X and
    on A the delete of the first file; B's upload keeps its bytes."""
    name = await harness.create_pg_database()
    url = harness.pg_url(name)
    try:
        a = await start_server(harness.test_settings(url, tmp_path))
        b = await start_server(harness.test_settings(url, tmp_path), migrate=False)
        try:
            h = (await make_team(a.state)).owner.headers
            lost = []
            async with http_client(a) as on_a, http_client(b) as on_b:
                for i in range(100):
                    data = os.urandom(20_000)
                    first = (await upload(on_a, h, data)).json()["id"]
                    made, gone = await asyncio.gather(
                        upload(on_b, h, data), on_a.delete(f"/files/{first}", headers=h)
                    )
                    assert made.status_code == 201 and gone.status_code == 204
                    r = await on_b.get(f"/files/{made.json()['id']}/content", headers=h)
                    if r.status_code != 200 or r.content != data:
                        lost.append(i)
            assert lost == [], f"{len(lost)} of 100 uploads lost their bytes"
        finally:
            await b.stop()
            await a.stop()
    finally:
        await harness.drop_pg_database(name)
