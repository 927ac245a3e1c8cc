"""The app factory. Nothing is created at import time: ``create_app`` builds
the app and its lifespan opens (and closes) every resource it uses."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chathub import __version__, logs
from chathub.auth import TokenCodec
from chathub.config import Settings
from chathub.handlers.schemas import refine_openapi
from chathub.llm.factory import create_providers
from chathub.server import metrics, problems
from chathub.server.bus import create_bus
from chathub.server.credentials import SocketCredentials
from chathub.server.dashboards import Dashboards
from chathub.server.extraction import Extractor
from chathub.server.head import HeadAsGet
from chathub.server.hub import Hub
from chathub.server.input_checks import InputChecks
from chathub.server.leases import create_leases
from chathub.server.limits import MULTIPART_OVERHEAD, BodyLimit
from chathub.server.metrics import HttpMetrics
from chathub.server.purger import Purger
from chathub.server.ratelimit import create_rate_limiter
from chathub.server.reaper import ReplyReaper
from chathub.server.replies import Replies
from chathub.server.session_feed import SessionFeed
from chathub.server.session_log import create_session_log
from chathub.server.state import AppState
from chathub.storage.blobs import BlobStore
from chathub.storage.db import create_engine, create_sessionmaker
from chathub.storage.migrate import upgrade_async

log = logging.getLogger("chathub")


class ChathubApp(FastAPI):
    """FastAPI, with one WebSocket endpoint served before its middleware and
    routing layers (see ``chathub.handlers.ws.websocket_app``: each layer
    would stay on every open socket's stack)."""

    def __init__(self, *, socket_path: str, socket_app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.socket_path = socket_path
        self.socket_app = socket_app
        # Set while serving: what to do when the server starts closing its
        # sockets, before it does (see chathub.server.ws_protocol).
        self.closing_hook: Callable[[], Awaitable[None]] | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = refine_openapi(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and _route_path(scope) == self.socket_path:
            await self.socket_app(scope, receive, send)
            return
        if scope["type"] == "http":
            send = _with_request_id(scope, send)
        await super().__call__(scope, receive, send)


def _with_request_id(scope: Scope, send: Send) -> Send:
    """Bind the request's id for its log records (the client's
    ``X-Request-ID``, or a new one) and send it back in the response."""
    header = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    request_id = logs.request_id_from(header)
    logs.bind(request=request_id)
    echoed = (b"x-request-id", request_id.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), echoed]}
        await send(message)

    return send_with_id


def _route_path(scope: Scope) -> str:
    """The path without the ``root_path`` (the server's, e.g. behind a
    proxy), as routing sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def create_app(
    settings: Settings | None = None, *, migrate: bool | None = None, freeze_heap: bool = False
) -> FastAPI:
    """Build the ASGI app. ``migrate`` defaults to True on the embedded
    SQLite default, where no one else would run the migrations.
    ``freeze_heap``: once started, leave every object that exists then out of
    later garbage collections (for a process that serves this one app)."""
    settings = settings or Settings()
    # Fail fast, before serving, on settings that cannot run.
    tokens = TokenCodec(settings)
    settings.check_redis()
    provider, named_providers = create_providers(settings.llm, settings.llm_providers)
    run_migrations = settings.embedded if migrate is None else migrate

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        if run_migrations:
            await upgrade_async(url)
        engine = create_engine(url)
        sessionmaker = create_sessionmaker(engine)
        session_log = create_session_log(settings)
        bus = create_bus(settings)
        await bus.start()
        await session_log.start()
        hub = Hub(session_log)
        hub.start_heartbeats(settings.ws_heartbeat_s)
        dashboards = Dashboards(sessionmaker=sessionmaker, bus=bus, hub=hub)
        extractor = Extractor(
            sessionmaker=sessionmaker,
            provider=provider,
            dashboards=dashboards,
            debounce_s=settings.extraction_debounce_s,
        )
        blobs = BlobStore(settings.blob_dir)
        limiter = create_rate_limiter(settings)
        leases = create_leases(settings)
        session_feed = SessionFeed(bus=bus, hub=hub)
        state = AppState(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            tokens=tokens,
            blobs=blobs,
            provider=provider,
            named_providers=named_providers,
            session_log=session_log,
            bus=bus,
            hub=hub,
            replies=Replies(
                settings=settings,
                sessionmaker=sessionmaker,
                session_log=session_log,
                bus=bus,
                provider=provider,
                extractor=extractor,
                blobs=blobs,
                limiter=limiter,
                leases=leases,
                named_providers=named_providers,
                session_feed=session_feed,
            ),
            limiter=limiter,
            dashboards=dashboards,
            session_feed=session_feed,
            extractor=extractor,
            credentials=SocketCredentials(
                sessionmaker=sessionmaker, bus=bus, hub=hub, tokens=tokens
            ),
        )
        app.state.chathub = state
        state.credentials.start()
        reaper = ReplyReaper(
            settings=settings,
            sessionmaker=sessionmaker,
            session_log=session_log,
            leases=leases,
            is_local=state.replies.runs.__contains__,
            session_feed=session_feed,
        )
        await reaper.start()
        purger = Purger(settings=settings, sessionmaker=sessionmaker)
        purger.start()
        if freeze_heap:
            # What startup built (modules, mappers, the model) lives as long
            # as the process. A full collection stops every socket while it
            # scans the heap; frozen, those objects are no longer scanned (a
            # full collection after startup: about 50 ms before, under 1 after).
            gc.collect()
            gc.freeze()

        async def end_replies_then_sockets() -> None:
            # Each live reply's ending reaches its sockets before they close.
            await state.replies.interrupt_all()
            await hub.close()

        if isinstance(app, ChathubApp):
            app.closing_hook = end_replies_then_sockets
        try:
            yield {"chathub": state}
        finally:
            if isinstance(app, ChathubApp):
                app.closing_hook = None
            await reaper.close()
            await purger.close()
            await state.replies.close()
            await state.replies.summarizer.close()
            await extractor.close()
            await hub.close()
            state.credentials.close()
            state.dashboards.close()
            state.session_feed.close()
            await session_log.close()
            await bus.close()
            await limiter.close()
            await leases.close()
            await provider.aclose()
            await engine.dispose()
            metrics.process_exiting()

    from chathub.handlers import routers, ws

    app = ChathubApp(
        socket_path=ws.PATH,
        socket_app=ws.websocket_app,
        title="chathub",
        version=__version__,
        summary="Streaming, real-time chat backend for LLM conversations",
        lifespan=lifespan,
        **({} if settings.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )
    problems.install(app)

    def limit_for(path: str) -> int:
        # The upload limit is for the multipart body /files streams once the
        # caller is known; a JSON body is held to max_body_bytes on every
        # path, /files too, by the input checks, which read it before that.
        if path == "/files":
            return settings.max_file_bytes + MULTIPART_OVERHEAD
        return settings.max_body_bytes

    # The last added runs first: HEAD becomes GET before anything else looks;
    # the input checks read bodies inside the body limit.
    app.add_middleware(InputChecks, json_limit=settings.max_body_bytes)
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(HttpMetrics)
    app.add_middleware(HeadAsGet)

    for router in routers():
        app.include_router(router)
    return app
