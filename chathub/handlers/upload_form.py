"""The form of ``POST /files``, read as it streams: exactly one ``file``
part, staged to the blob store, and at most one ``session_id`` (empty: no
session); any other part is a 400. On any error nothing staged is left
behind."""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.requests import ClientDisconnect

from chathub.errors import BadRequest, ChathubError
from chathub.handlers.file_meta import canonical_id, normalize_mime, sanitize_name
from chathub.server.multipart import FormPart, MultipartStream
from chathub.storage.blobs import BlobStore, StagedBlob

# After refusing an upload, read (and drop) at most this much more of the
# body, so that a client still sending gets to read the error before the
# connection closes.
DRAIN_LIMIT = 1024 * 1024

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Upload:
    blob: StagedBlob
    name: str
    declared_content_type: str | None
    session_id: str | None


def _session_id_field(raw: bytes) -> str | None:
    """The session id, or None for an empty field: HTML forms send their
    empty inputs."""
    value = canonical_id(raw.decode("utf-8", "replace"))
    if not value:
        return None
    if not _UUID.match(value):
        raise BadRequest("session_id must be a session id")
    return value


async def receive_upload(form: MultipartStream, blobs: BlobStore, *, max_bytes: int) -> Upload:
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
    return Upload(
        blob=staged,
        name=sanitize_name(file_part.filename),
        declared_content_type=normalize_mime(file_part.content_type),
        session_id=session_id,
    )
