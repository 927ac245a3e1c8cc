"""What is said about an uploaded file, from untrusted input: its display
name, its content type (sniffed from its first bytes), the ``content_type``
list filter, the ids it is filed under as a client types them, and the name
it is downloaded under. Pure functions, no I/O."""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from urllib.parse import quote

import filetype

from chathub.errors import BadRequest
from chathub.storage.repositories.files import is_text_type

MAX_NAME_CHARS = 255
DEFAULT_NAME = "upload"
MAX_MIME_CHARS = 200  # the column's width
OCTET_STREAM = "application/octet-stream"

_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIME = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_MIME_PREFIX = re.compile(rf"^{_TOKEN}/\*?$")
# Control, format (bidi overrides, zero-width) and line/paragraph separators:
# invisible in a name, and some make one name look like another.
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


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


def canonical_id(value: str) -> str:
    """An id as it is stored: ids are UUID strings in lower case
    (``chathub.ids``), so the same id in upper case, or with spaces around
    it, names the same row."""
    return value.strip().lower()


def sniff_content_type(head: bytes, *, declared: str | None, truncated: bool) -> str:
    """The stored type of a file whose first bytes are ``head``
    (``truncated``: the file goes on past them).

    A declared text type holds only for bytes that are text: files of a
    text type are given to the model as they are (``server.replies``)."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    text = _is_text(head, truncated=truncated)
    if declared not in (None, OCTET_STREAM) and (text or not is_text_type(declared)):
        return declared
    return "text/plain" if text else OCTET_STREAM


def _is_text(head: bytes, *, truncated: bool) -> bool:
    """Whether ``head`` is UTF-8 without NUL bytes."""
    if b"\x00" in head:
        return False
    try:
        # A cut-off head may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=not truncated)
    except UnicodeDecodeError:
        return False
    return True


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` for old clients and the
    exact name as ``filename*`` (RFC 6266, RFC 5987 encoding)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    fallback = re.sub(r"[^A-Za-z0-9 !#$&+,.=@^_`~()\[\]{}-]", "_", ascii_name).strip() or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def content_type_filter(value: str) -> tuple[str | None, str | None]:
    """``(exact, prefix)`` from the ``content_type`` query parameter."""
    value = value.strip().lower()
    if _MIME_PREFIX.match(value):
        return None, value.removesuffix("*")
    if _MIME.match(value):
        return value, None
    raise BadRequest("content_type must be a type like 'image/png' or a prefix like 'image/'")
