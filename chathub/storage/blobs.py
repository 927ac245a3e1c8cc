"""Content-addressed blob store: file bytes on disk, named by their sha256.

A blob lives at ``root/ab/cd/<sha256>`` (the first two byte pairs of the hash
fan the files out over directories). Bytes are streamed into a temp file under
``root/tmp`` (the same filesystem, so the final rename is atomic) while they
are hashed; only a complete blob is ever visible under its name. Writing the
same bytes twice stores them once.

Guarantees:

- A failed write (too large, an error of the source, cancellation) leaves no
  temp file behind and never a partial blob.
- File I/O runs in worker threads, in chunks of ``WRITE_CHUNK`` bytes.
- "Add a reference to a blob" and "remove a blob nobody references" run one
  after the other: within a process under ``reference_lock``, across the
  processes that share the store under a database lock that callers take in
  the transaction adding or checking the reference (see ``reference_lock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from chathub.errors import TooLarge

HEAD_BYTES = 8 * 1024
"""How much of the start of a blob ``write_stream`` hands back for sniffing."""

WRITE_CHUNK = 1024 * 1024
"""Bytes gathered before each write in a worker thread."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    head: bytes
    """The first ``HEAD_BYTES`` bytes (fewer if the blob is smaller)."""


class _Spool:
    """One temp file being written. Every step takes the lock, so ``discard``
    run from the event loop waits for a write still running in a worker
    thread (whose awaiting task was cancelled) instead of racing it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._closed = False

    def open(self) -> None:
        with self._lock:
            if self._closed:  # discarded before this job got to run
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "xb")  # noqa: SIM115 - closed by finish/discard

    def write(self, data: bytearray) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(data)
            self.hasher.update(data)

    def finish(self) -> None:
        """Flush the bytes to disk and close the file."""
        with self._lock:
            if self._file is None:
                raise RuntimeError("spool was discarded")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def place(self, final: Path) -> bool:
        """Move the finished temp file to ``final``; if a blob is already
        there (same name, so same bytes) drop the temp file instead.
        Returns True when this call stored the blob."""
        with self._lock:
            if self._closed:
                raise RuntimeError("spool was discarded")
            self._closed = True
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                self.path.unlink(missing_ok=True)
                return False
            # Two writers of the same bytes may both get here: each replace is
            # atomic and the contents are identical, so either result is right.
            os.replace(self.path, final)
            _fsync_dir(final.parent)
            return True

    def discard(self) -> None:
        """Close and remove the temp file; idempotent, and a no-op after
        ``place``."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
            self.path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StagedBlob:
    """Bytes fully received into a temp file, not yet visible as a blob.
    Either ``commit`` or ``discard`` it; ``discard`` after ``commit`` is a
    no-op, so ``try: ... commit() finally: discard()`` is the usual shape."""

    def __init__(self, store: BlobStore, spool: _Spool, info: BlobInfo) -> None:
        self.info = info
        self._store = store
        self._spool = spool

    async def commit(self) -> bool:
        """Make the blob visible under its sha256 (atomic rename). Returns
        False when the blob already existed and the copy was dropped."""
        return await asyncio.to_thread(self._spool.place, self._store.path(self.info.sha256))

    def discard(self) -> None:
        """Remove the temp file. Synchronous on purpose: a close and an
        unlink, and it must complete even while the caller is being
        cancelled, which an ``await`` cannot promise."""
        self._spool.discard()


class BlobStore:
    """Blobs under ``root``, addressed by the hex sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, _RefLock] = {}

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (whether or not it exists).
        Raises ValueError for anything but 64 lowercase hex digits, so that
        no input can name a path outside the store."""
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)

    async def stat(self, sha256: str) -> os.stat_result | None:
        """The blob's stat, or None when it does not exist."""
        try:
            return await asyncio.to_thread(os.stat, self.path(sha256))
        except FileNotFoundError:
            return None

    async def open(self, sha256: str) -> BinaryIO:
        """The blob opened for binary reading; the caller closes it.
        Raises FileNotFoundError when it does not exist."""
        path = self.path(sha256)
        return await asyncio.to_thread(path.open, "rb")

    async def read_head(self, sha256: str, limit: int) -> bytes:
        """The first ``limit`` bytes of a blob (b"" when it is missing)."""

        def read() -> bytes:
            try:
                with self.path(sha256).open("rb") as f:
                    return f.read(limit)
            except FileNotFoundError:
                return b""

        return await asyncio.to_thread(read)

    async def delete(self, sha256: str) -> bool:
        """Remove the blob; True if it existed. Callers decide whether it is
        still referenced (see ``reference_lock``)."""
        path = self.path(sha256)

        def unlink() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(unlink)

    async def stage(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> StagedBlob:
        """Stream ``chunks`` into a temp file while hashing them.

        Raises TooLarge as soon as more than ``max_bytes`` arrive. On that or
        any other error, or cancellation, the temp file is removed before the
        exception propagates."""
        spool = _Spool(self.tmp_dir / f"{uuid.uuid4().hex}.part")
        size = 0
        head = bytearray()
        pending = bytearray()
        try:
            await asyncio.to_thread(spool.open)
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"file is larger than {max_bytes} bytes")
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    data, pending = pending, bytearray()
                    await asyncio.to_thread(spool.write, data)
            if pending:
                await asyncio.to_thread(spool.write, pending)
            await asyncio.to_thread(spool.finish)
        except BaseException:
            spool.discard()
            raise
        info = BlobInfo(sha256=spool.hasher.hexdigest(), size=size, head=bytes(head))
        return StagedBlob(self, spool, info)

    async def write_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> BlobInfo:
        """Store the bytes of ``chunks`` (at most ``max_bytes``, else
        TooLarge) and return their size, sha256 and head. Storing bytes that
        are already stored keeps the one copy."""
        staged = await self.stage(chunks, max_bytes=max_bytes)
        try:
            await staged.commit()
        finally:
            staged.discard()
        return staged.info

    @contextlib.asynccontextmanager
    async def reference_lock(self, sha256: str) -> AsyncIterator[None]:
        """Hold while adding a reference to ``sha256`` (rename + database
        commit) or while checking that none is left and deleting the blob.

        Without it, a delete could see no live reference, an upload of the
        same bytes could then find the blob present and drop its own copy, and
        the delete would remove the blob that upload now points to. The lock
        is per process, and its waiters hold no database connection. Across
        the server processes that share one volume, the same two steps are
        serialised through the database: callers also take the blob's
        advisory lock (``chathub.storage.locks``) in the transaction that
        adds or checks the reference, before the rename or the check, and
        hold it until that transaction ends."""
        entry = self._locks.setdefault(sha256, _RefLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[sha256]


class _RefLock:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
