"""The error tree shared by REST and WebSocket.

Every error a client can see is a :class:`ChathubError` with an HTTP status and
one of the contract's codes. REST renders it as problem+json, the socket as an
``error`` frame; the same class serves both. The contract fixes the codes, not
every status: a 405, 415 or 416 keeps its status and says ``bad_request``.

    ChathubError (500, internal)
    ├── BadRequest (400, bad_request)
    │   ├── MethodNotAllowed (405, bad_request)      with the Allow header
    │   ├── UnsupportedMediaType (415, bad_request)
    │   └── RangeNotSatisfiable (416, bad_request)   with Content-Range: bytes */size
    ├── Unauthorized (401, unauthorized)
    ├── Forbidden (403, forbidden)
    ├── NotFound (404, not_found)
    ├── Conflict (409, conflict)
    │   └── PreconditionFailed (409, conflict)  stale If-Match
    ├── TooLarge (413, too_large)
    ├── RateLimited (429, rate_limited)        carries retry_after_s
    ├── Unavailable (503, unavailable)
    └── NotImplementedYet (501, not_implemented)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChathubError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    def problem(self) -> dict[str, Any]:
        """The problem+json body (RFC 9457) with our ``code``."""
        return {
            "type": f"https://chathub.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }

    def http_headers(self) -> dict[str, str]:
        """Response headers that go with this error over HTTP."""
        return {}

    def frame(self, request_id: str | None = None) -> dict[str, Any]:
        """The WebSocket ``error`` frame."""
        body: dict[str, Any] = {"type": "error", "code": self.code, "message": self.detail}
        if request_id is not None:
            body["id"] = request_id
        body.update(self.extra)
        return body


class BadRequest(ChathubError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class MethodNotAllowed(BadRequest):
    status = 405
    title = "Method not allowed"

    def __init__(self, detail: str | None = None, *, allow: str) -> None:
        super().__init__(detail)
        self.allow = allow

    def http_headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class BodyTimeout(BadRequest):
    """408 ``bad_request``: the request body did not arrive in time."""

    status = 408
    title = "Request timeout"


class UnsupportedMediaType(BadRequest):
    status = 415
    title = "Unsupported media type"


class RangeNotSatisfiable(BadRequest):
    status = 416
    title = "Range not satisfiable"

    def __init__(self, detail: str | None = None, *, size: int) -> None:
        super().__init__(detail)
        self.size = size

    def http_headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class Unauthorized(ChathubError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ChathubError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(ChathubError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(ChathubError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PreconditionFailed(Conflict):
    title = "Version conflict"


class TooLarge(ChathubError):
    status = 413
    code = "too_large"
    title = "Too large"


class RateLimited(ChathubError):
    status = 429
    code = "rate_limited"
    title = "Rate limited"

    def __init__(self, detail: str | None = None, *, retry_after_s: float) -> None:
        super().__init__(detail, retry_after_s=round(retry_after_s, 3))
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Unavailable(ChathubError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


class NotImplementedYet(ChathubError):
    status = 501
    code = "not_implemented"
    title = "Not implemented"
