"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import JSONResponse

from chathub import __version__
from chathub.handlers.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready"}})
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the database, the bus and the LLM provider answer."""
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(3):
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    checks["bus"] = "ok"
    bus = state.extras.get("bus")
    if bus is not None and hasattr(bus, "ready"):
        checks["bus"] = "ok" if await bus.ready() else "error"
    if state.provider is None:
        checks["llm"] = "not configured"
    else:
        try:
            checks["llm"] = "ok" if await state.provider.ready() else "error"
        except Exception as exc:
            checks["llm"] = f"error: {type(exc).__name__}"
    ready = all(v in ("ok", "not configured") for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
