"""Input no route can use, refused at the door with a 400 (a pure ASGI
middleware, inside the body limit).

- A NUL character in the path or the query string (``%00``): ids and filters
  go to the database, whose text (on PostgreSQL) cannot hold one.
- A JSON body that is not strict JSON (``NaN``, ``Infinity``, lone
  surrogates, numbers beyond a double: Python's parser, which FastAPI uses,
  takes them all) or breaks :mod:`chathub.client_json`'s rules (a NUL in
  any string, nesting too deep). The body is read here, checked, and handed
  on unchanged; FastAPI parses it again, now knowing it is sound.

Refusing here, once, covers every route, whatever model (or none) reads the
body, instead of each model or query parameter checking for itself.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chathub.client_json import find_problem
from chathub.errors import BadRequest
from chathub.server.problems import problem_response


class InputChecks:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = url_problem(scope)
        if problem is None and is_json(scope):
            messages = await _read_body(receive)
            problem = body_problem(b"".join(m.get("body", b"") for m in messages))
            receive = _replay(messages, receive)
        if problem is not None:
            await problem_response(BadRequest(problem))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def url_problem(scope: Scope) -> str | None:
    if "\x00" in scope["path"]:
        return "the path contains a NUL character (%00)"
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        return "the query string contains a NUL character (%00)"
    return None


def is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse this body as JSON (``application/json``
    or ``application/*+json``)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            mime: bytes = value.split(b";", 1)[0].strip().lower()
            return mime == b"application/json" or (
                mime.startswith(b"application/") and mime.endswith(b"+json")
            )
    return False


def body_problem(body: bytes) -> str | None:
    if not body:
        return None  # no body: the route says whether it needs one
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"the body is not valid JSON: {exc}"
    return find_problem(value)


async def _read_body(receive: Receive) -> list[Message]:
    """Every message of the request body (to its end, or to a disconnect)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
