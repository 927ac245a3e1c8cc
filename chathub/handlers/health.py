"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from chathub import __version__
from chathub.errors import Unavailable
from chathub.handlers.deps import StateDep
from chathub.handlers.schemas import errors
from chathub.server import metrics
from chathub.server.problems import problem_response

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
    """Ready when the database, the bus and the LLM provider answer; when
    not, a problem (``unavailable``) whose ``checks`` say which did not."""
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(3):
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    for name, probe in (
        ("bus", state.bus.ready),
        ("session_log", state.session_log.ready),
        ("llm", state.provider.ready),
    ):
        try:
            async with asyncio.timeout(3):
                checks[name] = "ok" if await probe() else "error"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}"
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return problem_response(Unavailable(f"not ready: {', '.join(failed)}", checks=checks))
    return JSONResponse({"status": "ready", "checks": checks})
