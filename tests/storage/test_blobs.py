"""The blob store on its own, on a temp directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from chathub.errors import TooLarge
from chathub.storage.blobs import HEAD_BYTES, WRITE_CHUNK, BlobStore


async def chunks_of(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_round_trip_layout_and_head(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(3 * WRITE_CHUNK + 12345)
    info = await store.write_stream(
        chunks_of(data[i : i + 65536] for i in range(0, len(data), 65536)),
        max_bytes=len(data),
    )
    digest = hashlib.sha256(data).hexdigest()
    assert info.sha256 == digest
    assert info.size == len(data)
    assert info.head == data[:HEAD_BYTES]
    assert store.path(digest) == tmp_path / digest[:2] / digest[2:4] / digest
    assert files_under(tmp_path) == [store.path(digest)]
    assert await store.exists(digest)
    with await store.open(digest) as f:
        assert f.read() == data


async def test_small_and_empty_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    empty = await store.write_stream(chunks_of([]), max_bytes=10)
    assert empty.size == 0 and empty.head == b""
    assert empty.sha256 == hashlib.sha256(b"").hexdigest()
    small = await store.write_stream(chunks_of([b"he", b"llo"]), max_bytes=5)
    assert small.head == b"hello" and small.size == 5
    assert store.path(small.sha256).read_bytes() == b"hello"


async def test_same_bytes_are_stored_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = await store.write_stream(chunks_of([b"same ", b"bytes"]), max_bytes=100)
    before = store.path(first.sha256).stat()
    second = await store.write_stream(chunks_of([b"same bytes"]), max_bytes=100)
    assert second.sha256 == first.sha256
    assert files_under(tmp_path) == [store.path(first.sha256)]
    # The copy was dropped, not written over the stored blob.
    assert store.path(first.sha256).stat().st_ino == before.st_ino


async def test_staged_blob_is_invisible_until_committed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    staged = await store.stage(chunks_of([b"draft"]), max_bytes=100)
    assert not await store.exists(staged.info.sha256)
    staged.discard()
    assert files_under(tmp_path) == []

    staged = await store.stage(chunks_of([b"final"]), max_bytes=100)
    assert await staged.commit() is True
    staged.discard()  # a no-op once committed
    assert await store.exists(staged.info.sha256)
    again = await store.stage(chunks_of([b"final"]), max_bytes=100)
    assert await again.commit() is False
    assert files_under(tmp_path) == [store.path(staged.info.sha256)]


async def test_exactly_at_the_limit_is_stored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    info = await store.write_stream(chunks_of([b"x" * 1000, b"y" * 24]), max_bytes=1024)
    assert info.size == 1024 and await store.exists(info.sha256)


@pytest.mark.parametrize("chunk", [1000, WRITE_CHUNK + 1, 3 * WRITE_CHUNK + 1])
async def test_too_large_leaves_nothing(tmp_path: Path, chunk: int) -> None:
    store = BlobStore(tmp_path)
    limit = 3 * WRITE_CHUNK
    data = os.urandom(limit + 1)
    with pytest.raises(TooLarge):
        await store.write_stream(
            chunks_of(data[i : i + chunk] for i in range(0, len(data), chunk)), max_bytes=limit
        )
    assert files_under(tmp_path) == []
    assert not await store.exists(hashlib.sha256(data).hexdigest())


async def test_a_failing_source_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * (2 * WRITE_CHUNK)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write_stream(broken(), max_bytes=10 * WRITE_CHUNK)
    assert files_under(tmp_path) == []


async def test_cancellation_mid_stream_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    stalled = asyncio.Event()

    async def slow_client() -> AsyncIterator[bytes]:
        for _ in range(3):  # enough that some of it has reached the disk
            yield os.urandom(WRITE_CHUNK)
        stalled.set()
        await asyncio.Event().wait()  # the rest never comes
        yield b""

    task = asyncio.create_task(store.write_stream(slow_client(), max_bytes=100 * WRITE_CHUNK))
    await asyncio.wait_for(stalled.wait(), 10)
    [temp] = files_under(tmp_path)
    assert temp.parent == store.tmp_dir and temp.stat().st_size >= 2 * WRITE_CHUNK
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []


async def test_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    info = await store.write_stream(chunks_of([b"bye"]), max_bytes=10)
    assert await store.delete(info.sha256) is True
    assert not await store.exists(info.sha256)
    assert await store.stat(info.sha256) is None
    assert await store.delete(info.sha256) is False
    with pytest.raises(FileNotFoundError):
        await store.open(info.sha256)


@pytest.mark.parametrize("name", ["../../etc/passwd", "A" * 64, "ab", "", "0" * 63 + "/"])
def test_only_hex_digests_name_a_blob(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path(name)


async def test_reference_lock_serialises_per_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    a, b = "a" * 64, "b" * 64
    order: list[str] = []

    async def hold(sha: str, label: str, delay: float) -> None:
        async with store.reference_lock(sha):
            order.append(f"{label} in")
            await asyncio.sleep(delay)
            order.append(f"{label} out")

    first = asyncio.create_task(hold(a, "1", 0.05))
    await asyncio.sleep(0)
    await asyncio.gather(hold(a, "2", 0), hold(b, "3", 0), first)
    # Same digest waits its turn; another digest does not.
    assert order.index("2 in") > order.index("1 out")
    assert order.index("3 in") < order.index("1 out")
