"""The ``chathub`` command: serve, migrate, bootstrap a team."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from chathub import logs
from chathub.config import ConfigError, Settings

log = logging.getLogger("chathub.cli")


class CommandFailed(Exception):
    """The command cannot do its job; the message says why (one line, exit 2)."""


def _database_problem(exc: BaseException) -> str | None:
    """What is wrong with the database, said in a line, when ``exc`` means
    it cannot be used as configured (down, unknown, refusing the login);
    None for any other error."""
    from sqlalchemy.exc import DBAPIError

    from chathub.storage.db import backend_unreachable

    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc)
        if sqlstate == "3D000" or sqlstate.startswith("28") or backend_unreachable(exc):
            return reason
        return None
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if backend_unreachable(exc):
        return str(exc) or type(exc).__name__
    return None


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def _database_errors(settings: Settings) -> Iterator[None]:
    """Turn "the database cannot be used" into one line naming it."""
    try:
        yield
    except Exception as exc:
        problem = _database_problem(exc)
        if problem is None:
            raise
        raise _unusable_database(settings, problem) from exc


def _unusable_database(settings: Settings, problem: str) -> CommandFailed:
    url = _safe_url(settings.resolved_database_url)
    return CommandFailed(
        f"cannot use the database {url}: {problem} (check CHATHUB_DATABASE_URL, "
        "and that the database is up)"
    )


def _make_data_dir(settings: Settings) -> None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandFailed(
            f"CHATHUB_DATA_DIR={str(settings.data_dir)!r} cannot be created: {exc.strerror or exc}"
        ) from exc
    if not os.access(settings.data_dir, os.W_OK | os.X_OK):
        raise CommandFailed(f"CHATHUB_DATA_DIR={str(settings.data_dir)!r} is not writable")


async def _read_schema_revision(url: str) -> str | None:
    from chathub.storage.db import create_engine
    from chathub.storage.migrate import schema_revision

    engine = create_engine(url)
    try:
        async with asyncio.timeout(10), engine.connect() as conn:
            return await schema_revision(conn)
    finally:
        await engine.dispose()


def _check_schema(settings: Settings) -> None:
    """Refuse to serve on a shared database whose schema lacks this code's
    migrations (every request would fail); one that cannot be reached now is
    waited for by the server (and /readyz says so)."""
    from chathub.storage.db import backend_unreachable
    from chathub.storage.migrate import head_revision, schema_is_behind

    try:
        revision = asyncio.run(_read_schema_revision(settings.resolved_database_url))
    except Exception as exc:
        problem = _database_problem(exc)
        if problem is None:
            raise
        if isinstance(exc, TimeoutError) or backend_unreachable(exc):
            log.warning("cannot check the database schema now (%s): starting anyway", problem)
            return
        raise _unusable_database(settings, problem) from exc  # unknown database, login refused
    if schema_is_behind(revision):
        where = f"is at {revision}" if revision else "is empty (never migrated)"
        raise CommandFailed(
            f"the database schema {where}, this chathub needs {head_revision()}: "
            "run `chathub db upgrade`"
        )


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from chathub.server.app import create_app
    from chathub.server.metrics import MULTIPROCESS_DIR
    from chathub.server.ws_protocol import uvicorn_settings

    if args.workers > 1 and (settings.embedded or not settings.redis_url):
        print(
            "chathub: --workers above 1 needs CHATHUB_DATABASE_URL (PostgreSQL) and "
            "CHATHUB_REDIS_URL: the workers share no memory, only those",
            file=sys.stderr,
        )
        return 2
    _make_data_dir(settings)
    try:
        app = create_app(settings, freeze_heap=True)
    except ConfigError as exc:
        print(f"chathub: {exc}", file=sys.stderr)
        return 2
    if not settings.embedded:
        _check_schema(settings)
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level,
        "log_config": None,  # uvicorn's loggers go through chathub.logs' handler
        **uvicorn_settings(settings),
        "timeout_graceful_shutdown": 10,
    }
    if args.workers > 1:
        # Each worker process builds its own app (worker_app) on one shared
        # listening socket; uvicorn restarts a worker that dies. A scrape of
        # /metrics reaches one of them: they keep their metrics in files,
        # and each answers with all of them (chathub.server.metrics).
        own_dir = not os.environ.get(MULTIPROCESS_DIR)
        if own_dir:
            os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="chathub-metrics-")
        try:
            uvicorn.run("chathub.cli:worker_app", factory=True, workers=args.workers, **options)
        finally:
            if own_dir:
                shutil.rmtree(os.environ.pop(MULTIPROCESS_DIR), ignore_errors=True)
    else:
        uvicorn.run(app, **options)
    return 0


def worker_app() -> Any:
    """The app of one ``chathub serve --workers N`` worker process, built
    from the environment as the parent's was (which checked it)."""
    from chathub.server.app import create_app
    from chathub.server.metrics import forget_dead_workers

    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    forget_dead_workers()
    return create_app(settings, freeze_heap=True)


def _db_upgrade(_args: argparse.Namespace, settings: Settings) -> int:
    from chathub.storage.migrate import upgrade

    if settings.embedded:
        _make_data_dir(settings)
    with _database_errors(settings):
        upgrade(settings.resolved_database_url)
    print("database is up to date")
    return 0


async def _bootstrap(team: str, email: str, name: str, settings: Settings) -> dict[str, str]:
    from chathub.storage.db import create_engine, create_sessionmaker, transaction
    from chathub.storage.repositories import teams

    engine = create_engine(settings.resolved_database_url)
    try:
        async with transaction(create_sessionmaker(engine)) as db:
            row = await teams.create_team(db, name=team)
            owner = await teams.add_member(db, team_id=row.id, email=email, name=name, role="owner")
            key = await teams.create_api_key(
                db, team_id=row.id, member_id=owner.id, name="bootstrap", role="owner"
            )
        return {"team_id": row.id, "user_id": owner.id, "api_key": key.secret}
    finally:
        await engine.dispose()


def _admin_bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded:
        _db_upgrade(args, settings)
    with _database_errors(settings):
        created = asyncio.run(_bootstrap(args.team, args.email, args.name or "", settings))
    print(f"team {args.team!r} created with owner {args.email}; the API key is shown once")
    print(json.dumps(created))
    return 0


def _email(value: str) -> str:
    from chathub.storage.repositories.teams import normalize_email

    try:
        return normalize_email(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from exc


def _at_least_one(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chathub", description="Run chathub, migrate its database, bootstrap a team."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        help="worker processes (above 1: PostgreSQL and Redis only)",
    )
    serve.set_defaults(func=_serve)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations to CHATHUB_DATABASE_URL")
    up.set_defaults(func=_db_upgrade)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    boot = admin_sub.add_parser("bootstrap", help="create a team, its owner and an API key")
    boot.add_argument("--team", required=True)
    boot.add_argument("--email", required=True, type=_email)
    boot.add_argument("--name", default="")
    boot.set_defaults(func=_admin_bootstrap)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CHATHUB_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"chathub: bad settings: {problems}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        # A value that is not the JSON its setting needs.
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"CHATHUB_{field.group(1).upper()}" if field else "a setting"
        why = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(f"chathub: bad settings: {name}: not valid JSON{why}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        result: int = args.func(args, settings)
    except (ConfigError, CommandFailed) as exc:
        print(f"chathub: {exc}", file=sys.stderr)
        return 2
    return result
