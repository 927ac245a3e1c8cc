"""``/files``: uploads (multipart, streamed to the blob store), listing,
metadata, content and soft delete.

Where the contract is silent:

- The multipart body may carry only the parts ``file`` (exactly one) and
  ``session_id`` (at most one, a session id of the caller's team), in either
  order; any other part is a 400. A ``file`` part without a filename gets
  the name ``upload``. An empty file (size 0) is a valid file.
- An empty ``session_id`` part (HTML forms send their empty inputs) is no
  session. A session id, here and in the list filter, is read in any case.
- ``content_type`` is sniffed from the first bytes (``filetype``); when that
  finds nothing, the declared part type is used, unless it is missing or
  ``application/octet-stream``, which say nothing, or it is a text type and
  the bytes are not text; then ``text/plain`` when the bytes are UTF-8
  without NUL bytes, else ``application/octet-stream``. The declared type
  (without parameters) is kept as ``declared_content_type``.
- The list filter ``content_type`` is an exact type (``image/png``), or a
  top-level type ending in ``/`` or ``/*`` (``image/``, ``image/*``), which
  matches by prefix. ``session_id`` of an unknown session lists nothing.
- ``Last-Modified`` of the content is the file's ``created_at``: the bytes
  are shared with every file of any team that has the same ones, so
  nothing about them (such as when they were first stored) may show.
- Uploads take from the member's and the team's upload bytes per minute
  (``CHATHUB_RATE_USER_UPLOAD_BYTES``, ``_TEAM_``): the declared
  ``Content-Length`` (multipart framing included) before the body is read,
  refused with 429 at once; without one (chunked), the stored size once it
  is stored, owed even past the limit, and an upload is refused while a
  bucket owes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from email.utils import formatdate
from typing import Annotated, BinaryIO

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette import responses as starlette
from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from chathub.auth import Principal
from chathub.errors import BadRequest, Forbidden, NotFound, RangeNotSatisfiable, RateLimited
from chathub.handlers.deps import PageDep, SessionDep, StateDep, Viewer, authenticate, bearer_token
from chathub.handlers.file_meta import (
    OCTET_STREAM,
    canonical_id,
    content_disposition,
    content_type_filter,
    sniff_content_type,
)
from chathub.handlers.schemas import Out, Page, errors
from chathub.handlers.upload_form import receive_upload
from chathub.server import ratelimit
from chathub.server.limits import refuse
from chathub.server.multipart import MultipartStream
from chathub.server.state import AppState
from chathub.storage.db import transaction
from chathub.storage.locks import advisory_xact_lock
from chathub.storage.repositories import audit
from chathub.storage.repositories import files as repo
from chathub.storage.repositories import sessions as sessions_repo

log = logging.getLogger("chathub.files")

router = APIRouter(prefix="/files", tags=["files"])


class FileOut(Out):
    id: str
    name: str
    size: int
    content_type: str
    declared_content_type: str | None
    sha256: str
    uploaded_by: str | None
    session_id: str | None
    created_at: datetime


# --- auth for the writing routes ---------------------------------------------


async def _member_own_tx(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """``MemberUser``, but checked in a transaction of its own, committed at
    once. The request-wide transaction would keep the API key's
    ``last_used_at`` update (on SQLite: the database write lock) open for as
    long as a client takes to stream its upload; these routes open their own
    short transaction when they have something to write."""
    async with transaction(state.sessionmaker) as db:
        principal = await authenticate(state, db, bearer_token(authorization))
    if not principal.has_role("member"):
        raise Forbidden("this needs the member role or higher")
    return principal


Writer = Annotated[Principal, Depends(_member_own_tx)]


# --- routes -----------------------------------------------------------------


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "session_id": {"type": "string", "format": "uuid"},
                },
            }
        }
    },
}


class UnreadBodyRefusal(Response):
    """A refusal answered before the body is read: sent at once, then the
    body is read and dropped (within the upload limit, for at most 30 s)
    before the connection closes, so that a client or a proxy still sending
    it reads the answer instead of a reset (``chathub.server.limits.refuse``)."""

    def __init__(self, error: RateLimited) -> None:
        super().__init__(status_code=error.status)
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(send, receive, self.error)


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    responses=errors(403, 404, 413, 429),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_file(
    request: Request, principal: Writer, state: StateDep, response: Response
) -> FileOut | Response:
    """Upload a file: ``multipart/form-data`` with the part ``file`` and
    optionally ``session_id``. The body is streamed to disk; a file over
    ``max_file_bytes`` is refused with 413 and leaves nothing behind; past
    the upload bytes per minute, 429 (see the module docstring)."""
    s = state.settings
    buckets = [
        (f"upload:u:{principal.member_id}", s.rate_user_upload_bytes),
        (f"upload:t:{principal.team_id}", s.rate_team_upload_bytes),
    ]
    declared = _declared_length(request)
    try:
        # Without a length, nothing is taken yet: only a bucket that owes refuses.
        await ratelimit.take(
            state.limiter, [("upload bytes", key, declared or 0, limit) for key, limit in buckets]
        )
    except RateLimited as exc:
        return UnreadBodyRefusal(exc)
    form = MultipartStream.from_request(request)
    upload = await receive_upload(form, state.blobs, max_bytes=s.max_file_bytes)
    info = upload.blob.info
    try:
        if declared is None:  # what arrived is owed, even should the rest fail
            await ratelimit.owe(state.limiter, buckets, info.size)
        content_type = sniff_content_type(
            info.head,
            declared=upload.declared_content_type,
            truncated=info.size > len(info.head),
        )
        # The locks span the rename and the commit of the row that references
        # the blob; see BlobStore.reference_lock and _collect_blob.
        async with (
            state.blobs.reference_lock(info.sha256),
            transaction(state.sessionmaker) as db,
        ):
            if upload.session_id is not None:
                await sessions_repo.get_session(
                    db, team_id=principal.team_id, session_id=upload.session_id
                )
            row = await repo.create_file(
                db,
                team_id=principal.team_id,
                name=upload.name,
                size=info.size,
                content_type=content_type,
                declared_content_type=upload.declared_content_type,
                sha256=info.sha256,
                uploaded_by=principal.member_id,
                session_id=upload.session_id,
            )
            await audit.record(
                db,
                team_id=principal.team_id,
                actor_id=principal.member_id,
                action="file.upload",
                target_type="file",
                target_id=row.id,
                data={
                    "name": row.name,
                    "size": row.size,
                    "sha256": row.sha256,
                    "content_type": row.content_type,
                    "session_id": row.session_id,
                },
            )
            await db.flush()
            await _lock_blob(db, info.sha256)
            # Last, so that nothing before it can fail after the blob is in
            # place. If the commit itself fails, the blob may stay on disk
            # without a row: wasted space, never a row without its bytes.
            await upload.blob.commit()
    finally:
        upload.blob.discard()
    response.headers["Location"] = f"/files/{row.id}"
    return FileOut.model_validate(row)


@router.get("", responses=errors())
async def list_files(
    principal: Viewer,
    db: SessionDep,
    page: PageDep,
    content_type: Annotated[
        str | None,
        Query(max_length=255, description="exact ('image/png') or prefix ('image/', 'image/*')"),
    ] = None,
    session_id: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=200, description="name contains")] = None,
) -> Page[FileOut]:
    """The team's files, newest first."""
    exact, prefix = content_type_filter(content_type) if content_type else (None, None)
    result = await repo.list_files(
        db,
        team_id=principal.team_id,
        limit=page.limit,
        cursor=page.cursor,
        content_type=exact,
        content_type_prefix=prefix,
        session_id=canonical_id(session_id) if session_id is not None else None,
        q=q,
    )
    return Page(
        items=[FileOut.model_validate(f) for f in result.items], next_cursor=result.next_cursor
    )


@router.get("/{file_id}", responses=errors(404))
async def get_file(file_id: str, principal: Viewer, db: SessionDep) -> FileOut:
    row = await repo.get_file(db, team_id=principal.team_id, file_id=file_id)
    return FileOut.model_validate(row)


class BlobResponse(FileResponse):
    """Starlette's file response (``Range``, ``If-Range``, ``HEAD``) over a
    blob the handler has already opened, whose refusals of a ``Range`` header
    are our errors, rendered as problem+json like every other, rather than
    its plain-text ones.

    Starlette opens its file by path only after it has sent the status line
    and headers, so a blob removed in between (the last file with those bytes
    deleted) would turn a 200 into a broken connection. An open file keeps
    its bytes however the blob is unlinked: the download is either the
    handler's 404 or whole. The file is closed once the response is sent,
    refused or abandoned."""

    def __init__(self, blob: BinaryIO, *, headers: Mapping[str, str]) -> None:
        super().__init__(blob.name, headers=headers, stat_result=os.fstat(blob.fileno()))
        self._blob = blob

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Synchronous: it must happen even while the task is cancelled.
            self._blob.close()

    @contextlib.asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.AsyncFile(self._blob)

    async def _handle_simple(self, send: Send, send_header_only: bool, send_pathsend: bool) -> None:
        # With ``http.response.pathsend`` the server would open the path.
        await super()._handle_simple(send, send_header_only, send_pathsend=False)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except starlette.MalformedRangeHeader as exc:
            raise BadRequest(f"Range: {exc.content.removeprefix('Range header: ')}") from exc
        except starlette.RangeNotSatisfiable as exc:
            raise RangeNotSatisfiable(
                f"Range: no byte of it is within the file's {file_size} bytes", size=exc.max_size
            ) from exc


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/{file_id}/content",
    response_class=BlobResponse,
    status_code=200,  # BlobResponse's own signature names none
    responses={
        200: {"description": "The bytes", "content": {OCTET_STREAM: {}}},
        206: {"description": "The bytes of the `Range` asked for"},
        304: {"description": "Not modified (`If-None-Match` matched the ETag)"},
        **errors(404, 416),
    },
)
async def get_content(
    file_id: str,
    principal: Viewer,
    db: SessionDep,
    state: StateDep,
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The file's bytes, streamed, as an attachment. The ETag is the sha256,
    ``Last-Modified`` the file's creation; ``Range`` requests are served."""
    row = await repo.get_file(db, team_id=principal.team_id, file_id=file_id)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        blob = await state.blobs.open(row.sha256)
    except FileNotFoundError:
        log.error("file %s: blob %s is missing from the store", row.id, row.sha256)
        raise NotFound("the file's content is missing") from None
    headers |= {
        # The file's own date, not the shared blob's (see the module
        # docstring); If-Range by date compares with this one.
        "Last-Modified": formatdate(row.created_at.timestamp(), usegmt=True),
        # Set here rather than as media_type, which would add a charset to
        # text types that we do not know.
        "Content-Type": row.content_type,
        "Content-Disposition": content_disposition(row.name),
        "X-Content-Type-Options": "nosniff",
        # Uploaded HTML or SVG opened directly must not run as our origin.
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    return BlobResponse(blob, headers=headers)


@router.delete("/{file_id}", status_code=204, responses=errors(403, 404))
async def delete_file(file_id: str, principal: Writer, state: StateDep) -> Response:
    """Soft delete: the file is gone for every route; its bytes are removed
    once no live file of any team has the same content."""
    async with transaction(state.sessionmaker) as db:
        row = await repo.get_file(db, team_id=principal.team_id, file_id=file_id)
        await repo.delete_file(db, row)
        await audit.record(
            db,
            team_id=principal.team_id,
            actor_id=principal.member_id,
            action="file.delete",
            target_type="file",
            target_id=row.id,
            data={"name": row.name, "sha256": row.sha256},
        )
    await _collect_blob(state, row.sha256)
    return Response(status_code=204)


async def _collect_blob(state: AppState, sha256: str) -> None:
    """Remove the blob if no live file row references it any more.

    Uploads deduplicate by content across all teams, so other rows, of this
    team or any other, may share these bytes: the blob goes only with the
    last of them. The check runs after the delete has committed and, with
    the unlink, under the locks that uploads hold across their rename and
    commit (``_lock_blob`` in one transaction, so across processes), so a
    concurrent upload of the same bytes either is seen by the check or finds
    the blob gone and stores its own copy. A failure here leaves an
    unreferenced blob (wasted space), which is why it is logged and not
    reported: the delete itself has succeeded."""
    try:
        async with (
            state.blobs.reference_lock(sha256),
            transaction(state.sessionmaker) as db,
        ):
            await _lock_blob(db, sha256)
            if not await repo.blob_is_referenced(db, sha256=sha256):
                await state.blobs.delete(sha256)
    except Exception:
        log.exception("could not collect blob %s", sha256)


async def _lock_blob(db: AsyncSession, sha256: str) -> None:
    """Hold, until ``db``'s transaction ends, the lock of the blob ``sha256``
    that every server process sharing the database and the blob store takes
    to add a reference to it (rename and commit) or to remove it (check and
    unlink)."""
    await advisory_xact_lock(db, f"chathub:blob:{sha256}")
