"""``HEAD`` wherever ``GET`` is served (RFC 9110 §9.3.2), as HTTP clients,
proxies and link checkers expect: FastAPI routes answer only the methods
they declare, and no route here declares ``HEAD``.

A pure ASGI middleware: the request goes on as a ``GET`` and the response
keeps its status and headers (``Content-Length`` included) but loses its
body. A method a path does not serve stays ``405`` (whose ``Allow`` then
lists ``HEAD`` beside ``GET``, see ``chathub.server.problems``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif not ended and (
                message["type"] == "http.response.pathsend"
                or (message["type"] == "http.response.body" and not message.get("more_body"))
            ):
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, headers_only)
