"""REST routes and WebSocket frame handlers: thin, they call repositories
and services and never talk SQL themselves."""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    from chathub.handlers import auth, dashboard, files, health, modes, sessions, team, ws

    return [
        health.router,
        auth.router,
        sessions.router,
        dashboard.router,
        team.router,
        files.router,
        modes.router,
        ws.router,
    ]
