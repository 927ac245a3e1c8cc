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


PUBLIC_PATHS = frozenset({"/auth/token", "/healthz", "/readyz", "/metrics"})
"""The routes that take no credentials."""
PROBLEM = "application/problem+json"


def refine_openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's OpenAPI document, told what this API really does:

    * error bodies are ``application/problem+json`` with the ``Problem``
      schema (FastAPI files a response's model under ``application/json``);
    * a request FastAPI cannot validate is our ``400``, never ``422``;
    * every route but :data:`PUBLIC_PATHS` takes a bearer token (an API key
      or a JWT), so the interactive docs offer to send one."""
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for response in responses.values():
                content = response.get("content", {})
                if PROBLEM in content and "application/json" in content:
                    content[PROBLEM] = content.pop("application/json")
            if path in PUBLIC_PATHS:
                operation["security"] = []
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    spec["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`chk_…`) or a JWT from `POST /auth/token`",
        }
    }
    spec["security"] = [{"bearer": []}]
    return spec
