"""Running chathub for tests: a real uvicorn server on a free loopback port,
on a real database (SQLite file or a PostgreSQL database of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from sqlalchemy import text

from chathub.config import Settings
from chathub.server.app import create_app
from chathub.server.state import AppState
from chathub.server.ws_protocol import uvicorn_settings
from chathub.storage.db import transaction
from chathub.storage.models import Base
from chathub.storage.repositories import teams

PG_HOST = os.environ.get("CHATHUB_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("CHATHUB_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("CHATHUB_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("CHATHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
JWT_SECRET = "test-secret-" + "x" * 32


def pg_url(database: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database for this test run; returns its name."""
    name = f"chathub_test_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def test_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "jwt_secret": JWT_SECRET,
        "llm": "scripted://",
        "log_level": "warning",
        # Tests send bursts; the limits have tests of their own.
        "rate_user_messages": 0,
        "rate_team_messages": 0,
        "rate_user_tokens": 0,
        "rate_team_tokens": 0,
        "rate_user_sessions": 0,
        "rate_user_upload_bytes": 0,
        "rate_team_upload_bytes": 0,
        "ws_max_per_member": 0,
    }
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@dataclass
class RunningServer:
    """A chathub app served by uvicorn on 127.0.0.1."""

    settings: Settings
    port: int
    state: AppState
    _server: uvicorn.Server
    _task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def stop(self) -> None:
        """Stop as on SIGTERM; a server not stopped within 15 s fails with
        what it was still doing (its open connections and the loop's
        tasks), then is cancelled."""
        self._server.should_exit = True
        done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
        if done:
            with contextlib.suppress(asyncio.CancelledError):
                self._task.result()
            return
        stuck = _still_running(self._server)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._task, 5)
        raise AssertionError(f"the server on port {self.port} did not stop in time:\n{stuck}")


STOP_TIMEOUT_S = 15.0


def _still_running(server: uvicorn.Server) -> str:
    """The connections a stopping server still has, and every other task of
    the loop with where it waits (a report for a stop that hangs)."""
    state = server.server_state
    lines = [f"{len(state.connections)} connection(s), {len(state.tasks)} request task(s)"]
    current = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        where = " -> ".join(_awaiting(task.get_coro())[-5:])
        lines.append(f"- {task.get_name()}: {where}")
    return "\n".join(lines)


def _awaiting(awaitable: Any) -> list[str]:
    """Where a suspended coroutine waits, outermost first: the chain of
    coroutines and generators it awaits."""
    chain = []
    while awaitable is not None:
        frame = _first_attr(awaitable, "cr_frame", "gi_frame", "ag_frame")
        if frame is not None:
            code = frame.f_code
            chain.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        awaitable = _first_attr(awaitable, "cr_await", "gi_yieldfrom", "ag_await")
    return chain


def _first_attr(obj: Any, *names: str) -> Any:
    return next((v for name in names if (v := getattr(obj, name, None)) is not None), None)


async def serve(app: Any, **config: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """Serve an ASGI app with uvicorn on a free loopback port, in this loop;
    returns the server, its task and the port once it listens."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", ws_ping_interval=None, **config
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
        raise RuntimeError("server stopped during startup")
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def start_server(settings: Settings, *, migrate: bool = True) -> RunningServer:
    app = create_app(settings, migrate=migrate)
    server, task, port = await serve(app, lifespan="on", **uvicorn_settings(settings))
    return RunningServer(settings, port, app.state.chathub, server, task)


@contextlib.asynccontextmanager
async def server_on(backend: str, data_dir: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """A server of its own on ``sqlite`` (a file in ``data_dir``) or on
    ``postgres`` (a database of its own, dropped afterwards), with
    ``overrides`` applied to the test settings."""
    pg_name = None
    if backend == "postgres":
        pg_name = await create_pg_database()
        url = pg_url(pg_name)
    else:
        url = f"sqlite+aiosqlite:///{data_dir / 'chathub.db'}"
    server = await start_server(test_settings(url, data_dir, **overrides))
    try:
        yield server
    finally:
        await server.stop()
        if pg_name is not None:
            await drop_pg_database(pg_name)


@contextlib.asynccontextmanager
async def replicas(
    data_dir: Path, count: int = 2, **overrides: Any
) -> AsyncIterator[list[RunningServer]]:
    """``count`` servers on one fresh PostgreSQL database (dropped
    afterwards) and the test Redis, each with a data directory of its own
    under ``data_dir`` and ``overrides`` applied to the test settings."""
    name = await create_pg_database()
    servers: list[RunningServer] = []
    try:
        for i in range(count):
            settings = test_settings(
                pg_url(name), data_dir / f"r{i}", redis_url=REDIS_URL, **overrides
            )
            servers.append(await start_server(settings, migrate=i == 0))
        yield servers
    finally:
        for server in servers:
            await server.stop()
        await drop_pg_database(name)


async def wipe(state: AppState) -> None:
    """Empty every table, children first, so each test starts clean."""
    async with transaction(state.sessionmaker) as db:
        if db.bind.dialect.name == "postgresql":
            # Version rows refuse DELETE outside an explicit purge.
            await db.execute(text("SET LOCAL chathub.allow_purge = 'on'"))
        for table in reversed(Base.metadata.sorted_tables):
            await db.execute(text(f'DELETE FROM "{table.name}"'))


@dataclass
class Actor:
    """A member of a team with an API key: ``headers`` authenticates as them."""

    team_id: str
    member_id: str
    role: str
    api_key: str
    api_key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class TeamFixture:
    team_id: str
    owner: Actor
    _state: AppState
    _members: dict[str, Actor] = field(default_factory=dict)

    async def actor(self, role: str, email: str | None = None) -> Actor:
        """A new member with ``role`` (and an API key of that role)."""
        return await add_actor(self._state, self.team_id, role, email)


async def add_actor(state: AppState, team_id: str, role: str, email: str | None = None) -> Actor:
    async with transaction(state.sessionmaker) as db:
        member = await teams.add_member(
            db,
            team_id=team_id,
            email=email or f"{role}-{secrets.token_hex(4)}@example.com",
            name=role.title(),
            role=role,
        )
        key = await teams.create_api_key(
            db, team_id=team_id, member_id=member.id, name=f"{role} key", role=role
        )
    return Actor(team_id, member.id, role, key.secret, key.row.id)


async def make_team(state: AppState, name: str = "Acme") -> TeamFixture:
    async with transaction(state.sessionmaker) as db:
        team = await teams.create_team(db, name=name)
    owner = await add_actor(state, team.id, "owner", f"owner-{secrets.token_hex(4)}@example.com")
    return TeamFixture(team.id, owner, state)


@contextlib.asynccontextmanager
async def http_client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
