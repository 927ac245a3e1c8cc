"""A streaming ``multipart/form-data`` reader over a request body.

Guarantees:

- The body is parsed as it arrives: parts in order, each part's data as a
  stream; at most the events of one network chunk are held, never a whole
  part.
- A body that is not ``multipart/form-data`` with a boundary, is malformed,
  or ends before its closing boundary is :class:`BadRequest`.

It knows nothing of routes: which parts a form may carry is the caller's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from chathub.errors import BadRequest

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks


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
