"""Input no route can use, refused at the door (a pure ASGI middleware,
inside the body limit, before routing and authentication).

- A NUL character in the path or the query string (``%00``): ids and filters
  go to the database, whose text (on PostgreSQL) cannot hold one. 400.
- A JSON body that is not strict JSON (``NaN``, ``Infinity``, lone
  surrogates, numbers beyond a double: Python's parser, which FastAPI uses,
  takes them all) or breaks :mod:`chathub.client_json`'s rules (a NUL in
  any string, nesting too deep). The body is read here, checked, and handed
  on unchanged; FastAPI parses it again, now knowing it is sound. 400.
- A JSON body larger than the JSON limit (``CHATHUB_MAX_BODY_BYTES``) on any
  path, ``/files`` included: the upload limit is for multipart bodies, which
  are streamed after authentication, while a JSON body is read whole here,
  before anyone is known. 413, with no more of it read than the limit.
- A JSON body that takes longer than :data:`JSON_BODY_TIMEOUT_S` to arrive:
  a stalled body would hold its buffer (and a task) for as long as the client
  likes. 408.

A 413 or a 408 closes the connection (``Connection: close``). After a 413
the rest of the body is read and dropped (up to the path's body limit, for
at most 30 s), so that a proxy still sending it is not reset: nginx counts a
reset as its upstream failing, and takes it out of rotation.

Refusing here, once, covers every route, whatever model (or none) reads the
body, instead of each model or query parameter checking for itself.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chathub.client_json import find_problem
from chathub.errors import BadRequest, BodyTimeout, TooLarge
from chathub.server.limits import refuse, too_large
from chathub.server.problems import problem_response

JSON_BODY_TIMEOUT_S = 30.0
"""How long a JSON body may take to arrive, from the request's headers to
its last byte (at the default 1 MiB limit, 35 KB/s at the least)."""


class InputChecks:
    def __init__(self, app: ASGIApp, *, json_limit: int) -> None:
        self.app = app
        self.json_limit = json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = url_problem(scope)
        if problem is None and is_json(scope):
            try:
                async with asyncio.timeout(JSON_BODY_TIMEOUT_S):
                    messages = await _read_body(scope, receive, self.json_limit)
            except TooLarge as exc:
                # The rest is read up to the path's own body limit: a JSON
                # body on /files may be as long as an upload, behind a proxy
                # that lets it through.
                await refuse(send, receive, exc)
                return
            except TimeoutError:
                error = BodyTimeout(
                    f"the request body did not arrive within {JSON_BODY_TIMEOUT_S:g} s"
                )
                await refuse(send, receive, error, drain=0)
                return
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


async def _read_body(scope: Scope, receive: Receive, limit: int) -> list[Message]:
    """Every message of the request body (to its end, or to a disconnect).
    Raises TooLarge, having read nothing, when the declared length is past
    ``limit``, or as soon as what has arrived is."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large(limit)
    messages = []
    received = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
