"""Shapes shared by every route: problem bodies, pages, documented errors."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Problem(BaseModel):
    """An error body (``application/problem+json``, RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    retry_after_s: float | None = None


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next."""

    items: list[T]
    next_cursor: str | None


class StrictBody(BaseModel):
    """A request body: unknown fields are refused, not silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Out(BaseModel):
    """A response object read from a row."""

    model_config = ConfigDict(from_attributes=True)


_DESCRIPTIONS = {
    400: "Malformed request, invalid field or cursor (`bad_request`)",
    401: "Missing, invalid, expired or revoked credentials (`unauthorized`)",
    403: "The caller's role is too low (`forbidden`)",
    404: "No such object in the caller's team (`not_found`)",
    409: "Conflict, such as a stale `If-Match` version (`conflict`)",
    413: "Body over the size limit (`too_large`)",
    416: "No byte of the `Range` is within the file (`bad_request`, with `Content-Range`)",
    429: "Rate limited (`rate_limited`, with `retry_after_s`)",
    503: "A dependency is unavailable (`unavailable`)",
    501: "Not available in this version",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error statuses (400, 401 always)."""
    wanted = sorted({400, 401, *statuses})
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {"application/problem+json": {}},
        }
        for status in wanted
    }
