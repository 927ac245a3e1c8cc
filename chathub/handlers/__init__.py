"""REST routes and WebSocket frame handlers: thin, they call repositories
and services and never talk SQL themselves."""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    """The REST routes. The socket (``chathub.handlers.ws``) is not among
    them: ``create_app`` serves it before FastAPI's routing."""
    from chathub.handlers import auth, dashboard, files, health, modes, sessions, team

    return [
        health.router,
        auth.router,
        sessions.router,
        dashboard.router,
        team.router,
        files.router,
        modes.router,
    ]
