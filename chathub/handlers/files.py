"""``/files``: uploads (multipart, streamed to the blob store), listing,
metadata, content and soft delete.

Where the contract is silent:

- The multipart body may carry only the parts ``file`` (exactly one) and
  ``session_id`` (at most one, a session id of the caller's team), in either
  order; any other part is a 400. A ``file`` part without a filename gets
  the name ``upload``. An empty file (size 0) is a valid file.
- ``content_type`` is sniffed from the first bytes (``filetype``); when that
  finds nothing, the declared part type is used, unless it is missing or
  ``application/octet-stream``, which say nothing; then ``text/plain`` when
  the bytes are UTF-8 without NUL bytes, else ``application/octet-stream``.
  The declared type (without parameters) is kept as
  ``declared_content_type``.
- The list filter ``content_type`` is an exact type (``image/png``), or a
  top-level type ending in ``/`` or ``/*`` (``image/``, ``image/*``), which
  matches by prefix. ``session_id`` of an unknown session lists nothing.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import unicodedata
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import filetype
from fastapi import APIRouter, Depends, Header, Query, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, Response

from chathub.auth import Principal
from chathub.errors import BadRequest, ChathubError, Forbidden, NotFound
from chathub.handlers.deps import PageDep, SessionDep, StateDep, Viewer, authenticate, bearer_token
from chathub.handlers.schemas import Out, Page, errors
from chathub.server.state import AppState
from chathub.storage.blobs import BlobStore, StagedBlob
from chathub.storage.db import transaction
from chathub.storage.repositories import audit
from chathub.storage.repositories import files as repo
from chathub.storage.repositories import sessions as sessions_repo

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("chathub.files")

router = APIRouter(prefix="/files", tags=["files"])

MAX_NAME_CHARS = 255
DEFAULT_NAME = "upload"
MAX_MIME_CHARS = 200  # the column's width
OCTET_STREAM = "application/octet-stream"
# After refusing an upload, read (and drop) at most this much more of the
# body, so that a client still sending gets to read the error before the
# connection closes.
DRAIN_LIMIT = 1024 * 1024

_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIME = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_MIME_PREFIX = re.compile(rf"^{_TOKEN}/\*?$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Control, format (bidi overrides, zero-width) and line/paragraph separators:
# invisible in a name, and some make one name look like another.
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


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


# --- pure helpers -----------------------------------------------------------


def sanitize_name(raw: str | None) -> str:
    """A display and download name: the last path component, without
    control or invisible characters, at most ``MAX_NAME_CHARS`` characters
    (keeping a short extension when cut)."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    name = name.strip()
    if name in ("", ".", ".."):
        return DEFAULT_NAME
    if len(name) > MAX_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        if 0 < len(ext) <= 16:
            name = stem[: MAX_NAME_CHARS - len(ext)].rstrip() + ext
        else:
            name = name[:MAX_NAME_CHARS]
    return name


def normalize_mime(value: str | None) -> str | None:
    """``type/subtype`` in lower case without parameters, or None."""
    if not value:
        return None
    mime = value.split(";", 1)[0].strip().lower()
    return mime if len(mime) <= MAX_MIME_CHARS and _MIME.match(mime) else None


def sniff_content_type(head: bytes, *, declared: str | None, truncated: bool) -> str:
    """The stored type of a file whose first bytes are ``head``
    (``truncated``: the file goes on past them)."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    if declared is not None and declared != OCTET_STREAM:
        return declared
    if b"\x00" not in head:
        try:
            # A cut-off head may end inside a multi-byte character.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=not truncated)
        except UnicodeDecodeError:
            return OCTET_STREAM
        return "text/plain"
    return OCTET_STREAM


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` for old clients and the
    exact name as ``filename*`` (RFC 6266, RFC 5987 encoding)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    fallback = re.sub(r"[^A-Za-z0-9 !#$&+,.=@^_`~()\[\]{}-]", "_", ascii_name).strip() or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


# --- streaming multipart ----------------------------------------------------


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    content_type: str | None


class MultipartStream:
    """A ``multipart/form-data`` body parsed as it arrives: parts in order,
    each part's data as a stream. It holds at most the events of one network
    chunk, never a whole part."""

    def __init__(self, body: AsyncIterator[bytes], boundary: bytes) -> None:
        self._body = body
        self._events: deque[tuple[str, Any]] = deque()
        self._complete = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, bytes] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise BadRequest(f"invalid multipart boundary: {exc}") from exc

    @classmethod
    def from_request(cls, request: Request) -> MultipartStream:
        value = request.headers.get("content-type", "")
        mime, params = parse_options_header(value.encode("latin-1", "replace"))
        boundary = params.get(b"boundary")
        if mime != b"multipart/form-data" or not boundary:
            raise BadRequest("the body must be multipart/form-data with a boundary")
        return cls(request.stream(), boundary)

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        self._events.append(("part", self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(("data", data[start:end]))

    def _on_part_end(self) -> None:
        self._events.append(("end", None))

    def _on_end(self) -> None:
        self._complete = True

    async def _next_event(self) -> tuple[str, Any]:
        while not self._events:
            if self._complete:
                return ("eof", None)
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                raise BadRequest("the multipart body ended before its closing boundary") from None
            try:
                self._parser.write(chunk)
            except FormParserError as exc:
                raise BadRequest(f"malformed multipart body: {exc}") from exc
        return self._events.popleft()

    async def next_part(self) -> FormPart | None:
        """The next part's headers, or None after the closing boundary.
        Data of the previous part that was not read is skipped."""
        while True:
            kind, value = await self._next_event()
            if kind == "part":
                return _form_part(value)
            if kind == "eof":
                return None

    async def part_data(self) -> AsyncIterator[bytes]:
        """The current part's data, chunk by chunk, up to its end."""
        while True:
            kind, value = await self._next_event()
            if kind == "data":
                yield value
            elif kind == "end":
                return
            else:
                raise BadRequest("malformed multipart body")

    async def read_part(self, *, limit: int) -> bytes:
        """The current part's data, which must be at most ``limit`` bytes."""
        out = bytearray()
        async for chunk in self.part_data():
            out += chunk
            if len(out) > limit:
                raise BadRequest(f"a form field is longer than {limit} bytes")
        return bytes(out)

    async def drain(self, *, limit: int) -> None:
        """Read and drop up to ``limit`` more bytes of the raw body."""
        seen = 0
        try:
            async for chunk in self._body:
                seen += len(chunk)
                if seen > limit:
                    return
        except (ClientDisconnect, HTTPException):
            return


def _form_part(headers: dict[str, bytes]) -> FormPart:
    disposition, params = parse_options_header(headers.get("content-disposition", b""))
    name = params.get(b"name")
    if disposition != b"form-data" or name is None:
        raise BadRequest("each multipart part needs 'Content-Disposition: form-data; name=...'")
    filename = params.get(b"filename")
    declared = headers.get("content-type")
    return FormPart(
        name=name.decode("utf-8", "replace"),
        # Browsers send file names as raw UTF-8.
        filename=None if filename is None else filename.decode("utf-8", "replace"),
        content_type=None if declared is None else declared.decode("latin-1"),
    )


@dataclass
class _Upload:
    blob: StagedBlob
    name: str
    declared_content_type: str | None
    session_id: str | None


def _session_id_field(raw: bytes) -> str:
    value = raw.decode("utf-8", "replace").strip().lower()
    if not _UUID.match(value):
        raise BadRequest("session_id must be a session id")
    return value


async def _receive_upload(form: MultipartStream, blobs: BlobStore, *, max_bytes: int) -> _Upload:
    """Read the whole body: the file part into a staged blob, the other
    fields into memory. On any error the staged blob is discarded."""
    staged: StagedBlob | None = None
    file_part: FormPart | None = None
    session_id: str | None = None
    seen_session_id = False
    try:
        while (part := await form.next_part()) is not None:
            if part.name == "file":
                if staged is not None:
                    raise BadRequest("only one 'file' part is allowed")
                staged = await blobs.stage(form.part_data(), max_bytes=max_bytes)
                file_part = part
            elif part.name == "session_id":
                if seen_session_id:
                    raise BadRequest("only one 'session_id' part is allowed")
                seen_session_id = True
                session_id = _session_id_field(await form.read_part(limit=64))
            else:
                raise BadRequest(
                    f"unexpected form field {part.name[:64]!r}: only 'file' and 'session_id'"
                )
        if staged is None or file_part is None:
            raise BadRequest("the multipart field 'file' is missing")
    except ClientDisconnect:
        if staged is not None:
            staged.discard()
        raise BadRequest("the client went away during the upload") from None
    except ChathubError:
        if staged is not None:
            staged.discard()
        await form.drain(limit=DRAIN_LIMIT)
        raise
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    return _Upload(
        blob=staged,
        name=sanitize_name(file_part.filename),
        declared_content_type=normalize_mime(file_part.content_type),
        session_id=session_id,
    )


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


@router.post(
    "",
    status_code=201,
    responses=errors(403, 404, 413),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_file(
    request: Request, principal: Writer, state: StateDep, response: Response
) -> FileOut:
    """Upload a file: ``multipart/form-data`` with the part ``file`` and
    optionally ``session_id``. The body is streamed to disk; a file over
    ``max_file_bytes`` is refused with 413 and leaves nothing behind."""
    form = MultipartStream.from_request(request)
    upload = await _receive_upload(form, state.blobs, max_bytes=state.settings.max_file_bytes)
    info = upload.blob.info
    try:
        content_type = sniff_content_type(
            info.head,
            declared=upload.declared_content_type,
            truncated=info.size > len(info.head),
        )
        # The lock spans the rename and the commit of the row that references
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
            # Last, so that nothing before it can fail after the blob is in
            # place. If the commit itself fails, the blob may stay on disk
            # without a row: wasted space, never a row without its bytes.
            await upload.blob.commit()
    finally:
        upload.blob.discard()
    response.headers["Location"] = f"/files/{row.id}"
    return FileOut.model_validate(row)


def _content_type_filter(value: str) -> tuple[str | None, str | None]:
    """``(exact, prefix)`` from the ``content_type`` query parameter."""
    value = value.strip().lower()
    if _MIME_PREFIX.match(value):
        return None, value.removesuffix("*")
    if _MIME.match(value):
        return value, None
    raise BadRequest("content_type must be a type like 'image/png' or a prefix like 'image/'")


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
    exact, prefix = _content_type_filter(content_type) if content_type else (None, None)
    result = await repo.list_files(
        db,
        team_id=principal.team_id,
        limit=page.limit,
        cursor=page.cursor,
        content_type=exact,
        content_type_prefix=prefix,
        session_id=session_id,
        q=q,
    )
    return Page(
        items=[FileOut.model_validate(f) for f in result.items], next_cursor=result.next_cursor
    )


@router.get("/{file_id}", responses=errors(404))
async def get_file(file_id: str, principal: Viewer, db: SessionDep) -> FileOut:
    row = await repo.get_file(db, team_id=principal.team_id, file_id=file_id)
    return FileOut.model_validate(row)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {"description": "The bytes", "content": {OCTET_STREAM: {}}},
        304: {"description": "Not modified (`If-None-Match` matched the ETag)"},
        **errors(404),
    },
)
async def get_content(
    file_id: str,
    principal: Viewer,
    db: SessionDep,
    state: StateDep,
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The file's bytes, streamed, as an attachment. The ETag is the sha256;
    ``Range`` requests are served."""
    row = await repo.get_file(db, team_id=principal.team_id, file_id=file_id)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    stat = await state.blobs.stat(row.sha256)
    if stat is None:
        log.error("file %s: blob %s is missing from the store", row.id, row.sha256)
        raise NotFound("the file's content is missing")
    headers |= {
        # Set here rather than as media_type, which would add a charset to
        # text types that we do not know.
        "Content-Type": row.content_type,
        "Content-Disposition": content_disposition(row.name),
        "X-Content-Type-Options": "nosniff",
        # Uploaded HTML or SVG opened directly must not run as our origin.
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    return FileResponse(state.blobs.path(row.sha256), headers=headers, stat_result=stat)


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
    the unlink, under the reference lock that uploads hold across their
    rename and commit, so a concurrent upload of the same bytes either is
    seen by the check or finds the blob gone and stores its own copy.
    A failure here leaves an unreferenced blob (wasted space), which is why
    it is logged and not reported: the delete itself has succeeded."""
    try:
        async with state.blobs.reference_lock(sha256):
            async with transaction(state.sessionmaker) as db:
                referenced = await repo.blob_is_referenced(db, sha256=sha256)
            if not referenced:
                await state.blobs.delete(sha256)
    except Exception:
        log.exception("could not collect blob %s", sha256)
