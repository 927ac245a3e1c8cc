"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import JSONResponse, Response

from chathub import __version__
from chathub.errors import Unavailable
from chathub.handlers.deps import StateDep
from chathub.handlers.schemas import errors
from chathub.server import metrics
from chathub.server.problems import problem_response
from chathub.storage.migrate import schema_is_behind, schema_revision

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok", "version": __version__}


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics_endpoint(state: StateDep) -> Response:
    """Prometheus metrics of this instance (every worker's, under ``--workers``)."""
    state.hub.record_queue_depth()
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", responses={503: errors(503)[503]})
async def readyz(state: StateDep) -> Response:
    """Ready when the database answers and its schema is at this code's
    migration (``schema``: ``chathub db upgrade`` has run), and the bus and
    every LLM provider answer (the default one as ``llm``, each of
    ``CHATHUB_LLM_PROVIDERS`` as ``llm:NAME``); when not, a problem
    (``unavailable``) whose ``checks`` say which did not. The probes run
    together, each given 3 s."""
    probes: dict[str, Callable[[], Awaitable[bool]]] = {
        "database": partial(_database_ready, state.engine),
        "schema": partial(_schema_ready, state.engine),
        "bus": state.bus.ready,
        "session_log": state.session_log.ready,
        "llm": state.provider.ready,
    }
    for name, provider in state.named_providers.items():
        probes[f"llm:{name}"] = provider.ready
    results = await asyncio.gather(*(_check(probe) for probe in probes.values()))
    checks: dict[str, Any] = dict(zip(probes, results, strict=True))
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return problem_response(Unavailable(f"not ready: {', '.join(failed)}", checks=checks))
    return JSONResponse({"status": "ready", "checks": checks})


async def _database_ready(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return True


# Engines whose schema was found at head (or newer): a schema is not
# downgraded under a running server, so once is enough.
_schema_at_head: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()


async def _schema_ready(engine: AsyncEngine) -> bool:
    if engine in _schema_at_head:
        return True
    async with engine.connect() as conn:
        at_head = not schema_is_behind(await schema_revision(conn))
    if at_head:
        _schema_at_head.add(engine)
    return at_head


async def _check(probe: Callable[[], Awaitable[bool]]) -> str:
    """``ok``, ``error`` (the probe said no), or ``error: ExceptionName``."""
    try:
        async with asyncio.timeout(3):
            return "ok" if await probe() else "error"
    except Exception as exc:
        return f"error: {type(exc).__name__}"
