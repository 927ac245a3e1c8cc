"""Rendering errors: problem+json for REST. One handler for every error type,
so no route can leak a 500 with a stack trace or a non-contract body."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from chathub.errors import (
    BadRequest,
    BodyTimeout,
    ChathubError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from chathub.storage.db import backend_unreachable

log = logging.getLogger("chathub.http")

PROBLEM_JSON = "application/problem+json"

_BY_STATUS: dict[int, type[ChathubError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: BodyTimeout,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: BadRequest,
    503: Unavailable,
}


def problem_response(error: ChathubError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(error.problem()),
        status_code=error.status,
        media_type=PROBLEM_JSON,
        headers={**(headers or {}), **error.http_headers()},
    )


def _describe(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())]
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


async def _chathub_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ChathubError)
    if exc.status >= 500:
        log.error("request failed: %s", exc.detail)
    return problem_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if isinstance(exc.body, bytes):
        # FastAPI reads a body as JSON only when its Content-Type says so;
        # otherwise the route's model is handed the raw bytes.
        return problem_response(
            UnsupportedMediaType("the body must be JSON (Content-Type: application/json)")
        )
    errors = _describe(list(exc.errors()))
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body") or "request"
    return problem_response(BadRequest(f"{where}: {first['msg']}", errors=errors))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = dict(exc.headers or {})
    error: ChathubError
    if exc.status_code == 405:
        allow = [m.strip() for m in headers.pop("Allow", "").split(",") if m.strip()]
        if "GET" in allow and "HEAD" not in allow:
            allow.append("HEAD")  # served by chathub.server.head.HeadAsGet
        allowed = ", ".join(allow)
        error = MethodNotAllowed(f"{request.method} is not allowed here ({allowed})", allow=allowed)
    elif exc.status_code in _BY_STATUS:
        error = _BY_STATUS[exc.status_code](detail)
    elif exc.status_code < 500:
        error = BadRequest(detail)
    else:
        error = ChathubError(detail)
    return problem_response(error, headers=headers)


async def _unhandled(_request: Request, exc: Exception) -> Response:
    if backend_unreachable(exc):
        # PostgreSQL or Redis is down or restarting: refused, not a fault.
        log.warning("request refused, a backing service failed: %r", exc)
        return problem_response(Unavailable("a backing service is unavailable; try again shortly"))
    log.exception("unhandled error", exc_info=exc)
    return problem_response(ChathubError("internal error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ChathubError, _chathub_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
