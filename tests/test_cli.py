"""The ``chathub`` command, run as a user would: in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from chathub.storage.models import Base
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_pg_database,
    drop_pg_database,
    http_client,
    pg_url,
    start_server,
    test_settings,
)

CHATHUB = Path(sys.executable).parent / "chathub"


async def run(*argv: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    """Run a command with only the given ``CHATHUB_*`` settings; returns
    ``(exit code, stdout, stderr)``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=clean | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv} did not finish within {timeout}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bootstrap_prints_a_key_that_works(tmp_path: Path) -> None:
    code, out, err = await run(
        sys.executable,
        "-m",
        "chathub",
        "admin",
        "bootstrap",
        "--team",
        "Initech",
        "--email",
        "Peter@Initech.example",
        "--name",
        "Peter",
        env={"CHATHUB_DATA_DIR": str(tmp_path)},
    )
    assert code == 0, err
    created = json.loads(out.strip().splitlines()[-1])
    assert set(created) == {"team_id", "user_id", "api_key"}
    assert created["api_key"].startswith("chk_")

    server = await start_server(
        test_settings(f"sqlite+aiosqlite:///{tmp_path}/chathub.db", tmp_path)
    )
    try:
        async with http_client(server) as client:
            headers = {"Authorization": f"Bearer {created['api_key']}"}
            r = await client.get("/team/members", headers=headers)
            assert r.status_code == 200, r.text
            [owner] = r.json()["items"]
            assert owner["id"] == created["user_id"]
            assert owner["role"] == "owner" and owner["email"] == "peter@initech.example"
            assert owner["name"] == "Peter"
            # an owner key: it may make more keys, owner ones included
            r = await client.post(
                "/team/api-keys", json={"name": "second", "role": "owner"}, headers=headers
            )
            assert r.status_code == 201, r.text
            token = await client.post("/auth/token", json={"api_key": created["api_key"]})
            assert token.status_code == 200
    finally:
        await server.stop()


async def test_bootstrap_twice_makes_two_separate_teams(tmp_path: Path) -> None:
    env = {"CHATHUB_DATA_DIR": str(tmp_path)}
    results = []
    for team in ("One", "Two"):
        code, out, err = await run(
            sys.executable, "-m", "chathub", "admin", "bootstrap",
            "--team", team, "--email", "same@example.com",
            env=env,
        )  # fmt: skip
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["team_id"] != results[1]["team_id"]
    assert results[0]["api_key"] != results[1]["api_key"]


async def test_db_upgrade_creates_the_tables_on_postgres() -> None:
    name = await create_pg_database()
    try:
        code, out, err = await run(
            str(CHATHUB), "db", "upgrade", env={"CHATHUB_DATABASE_URL": pg_url(name)}
        )
        assert code == 0, err
        assert "up to date" in out
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
        try:
            rows = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            revision = await conn.fetchval("SELECT version_num FROM alembic_version")
        finally:
            await conn.close()
        tables = {r["table_name"] for r in rows}
        assert set(Base.metadata.tables) <= tables
        assert revision
        # running it again is a no-op, not an error
        code, _, err = await run(
            str(CHATHUB), "db", "upgrade", env={"CHATHUB_DATABASE_URL": pg_url(name)}
        )
        assert code == 0, err
    finally:
        await drop_pg_database(name)


@pytest.mark.parametrize(
    "email",
    ["not-an-email", "a@" + "\u0130" * 245 + ".co"],  # the second: 495 characters lower-cased
)
async def test_bootstrap_refuses_a_bad_email_before_writing(tmp_path: Path, email: str) -> None:
    code, _, err = await run(
        str(CHATHUB), "admin", "bootstrap", "--team", "Bad", "--email", email,
        env={"CHATHUB_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert code == 2 and "--email" in err, err
    assert not (tmp_path / "chathub.db").exists()


async def test_bad_command_line_exits_non_zero(tmp_path: Path) -> None:
    code, _, err = await run(
        str(CHATHUB), "admin", "bootstrap", "--team", "NoEmail",
        env={"CHATHUB_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert code != 0 and "--email" in err
    assert not (tmp_path / "chathub.db").exists()


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("CHATHUB_LLM", "bogus://model", "CHATHUB_LLM='bogus://model'"),
        (
            "CHATHUB_LLM_PROVIDERS",
            '{"cheap": "openai://gpt-4o-mini"}',
            "CHATHUB_LLM_PROVIDERS['cheap']",
        ),
        ("CHATHUB_LLM_PROVIDERS", '{"odd": "scripted://?nope=1"}', "CHATHUB_LLM_PROVIDERS['odd']"),
        (
            "CHATHUB_LLM_PROVIDERS",
            '{"new": "bogus://m"}',
            "CHATHUB_LLM_PROVIDERS['new']='bogus://m'",
        ),
        ("CHATHUB_LOG_LEVEL", "loud", "CHATHUB_LOG_LEVEL"),
    ],
)
async def test_serve_refuses_settings_it_cannot_run_before_serving(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    """A provider URL it cannot use (also one only a mode names, or one
    missing its key) or an unknown log level: exit 2 with one line naming
    the setting, before anything is served or written."""
    env = {"CHATHUB_DATA_DIR": str(tmp_path), "CHATHUB_LLM": "scripted://", setting: value}
    clean_keys = {"OPENAI_API_KEY": ""}
    code, out, err = await run(str(CHATHUB), "serve", "--port", "0", env=env | clean_keys)
    assert code == 2, (out, err)
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "chathub.db").exists()


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        (
            "CHATHUB_ALLOWED_ORIGINS",
            "[https://a.example",
            "CHATHUB_ALLOWED_ORIGINS: not valid JSON",
        ),
        ("CHATHUB_LLM_PROVIDERS", "{fast: 1}", "CHATHUB_LLM_PROVIDERS: not valid JSON"),
        ("CHATHUB_DATABASE_URL", "mysql://u@h/db", "mysql:// is not supported"),
        ("CHATHUB_DATABASE_URL", "not a url", "not a database URL"),
        ("CHATHUB_DATABASE_URL", "postgresql://u@h/db", "write postgresql+asyncpg://"),
        ("CHATHUB_DATABASE_URL", "postgres://u@h/db", "write postgresql+asyncpg://"),
        ("CHATHUB_DATABASE_URL", "sqlite:///x.db", "write sqlite+aiosqlite://"),
        ("CHATHUB_REDIS_URL", "http://127.0.0.1:6379/0", "is not a Redis URL"),
        ("CHATHUB_REDIS_LOG_SHARDS", '["127.0.0.1:6379"]', "is not a Redis URL"),
    ],
)
@pytest.mark.parametrize("command", [("serve", "--port", "0"), ("db", "upgrade")])
async def test_misconfiguration_is_one_line_exit_2(
    tmp_path: Path, setting: str, value: str, says: str, command: tuple[str, ...]
) -> None:
    env = {"CHATHUB_DATA_DIR": str(tmp_path), "CHATHUB_LLM": "scripted://", setting: value}
    code, _, err = await run(str(CHATHUB), *command, env=env)
    assert code == 2, err
    line = one_line(err)
    assert setting in line and says in line, line
    assert not (tmp_path / "chathub.db").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--port", "0"),
        ("db", "upgrade"),
        ("admin", "bootstrap", "--team", "T", "--email", "e@example.com"),
    ],
)
async def test_a_data_dir_that_cannot_be_created_is_one_line_exit_2(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"
    env = {"CHATHUB_DATA_DIR": str(data_dir), "CHATHUB_LLM": "scripted://"}
    code, _, err = await run(str(CHATHUB), *command, env=env)
    assert code == 2, err
    assert "CHATHUB_DATA_DIR" in one_line(err) and "cannot be created" in err


@pytest.mark.parametrize("where", ["closed port", "unknown database"])
@pytest.mark.parametrize(
    "command",
    [("db", "upgrade"), ("admin", "bootstrap", "--team", "T", "--email", "e@example.com")],
)
async def test_an_unusable_database_is_one_line_exit_2(
    tmp_path: Path, where: str, command: tuple[str, ...]
) -> None:
    if where == "closed port":
        url = f"postgresql+asyncpg://{PG_USER}:secret@127.0.0.1:{closed_port()}/x"
    else:
        url = pg_url("chathub_no_such_database")
    env = {
        "CHATHUB_DATA_DIR": str(tmp_path),
        "CHATHUB_DATABASE_URL": url,
        "CHATHUB_JWT_SECRET": "s" * 40,
        "CHATHUB_LLM": "scripted://",
    }
    code, _, err = await run(str(CHATHUB), *command, env=env)
    assert code == 2, err
    line = one_line(err)
    assert "cannot use the database" in line and "CHATHUB_DATABASE_URL" in line, line
    assert "secret" not in line  # the password is not printed
    if where == "unknown database":
        assert "does not exist" in line


@pytest.mark.parametrize("revision", [None, "0002"])
async def test_serve_refuses_a_postgres_schema_behind_this_code(
    tmp_path: Path, revision: str | None
) -> None:
    """On PostgreSQL no one migrates but ``chathub db upgrade``: a replica
    started before it (or after a failed one) would answer every request
    with a 500; it exits instead, saying what to run."""
    from chathub.storage.migrate import head_revision, upgrade_async

    name = await create_pg_database()
    try:
        if revision:
            await upgrade_async(pg_url(name), revision)
        env = {
            "CHATHUB_DATA_DIR": str(tmp_path),
            "CHATHUB_DATABASE_URL": pg_url(name),
            "CHATHUB_JWT_SECRET": "s" * 40,
            "CHATHUB_LLM": "scripted://",
        }
        code, _, err = await run(str(CHATHUB), "serve", "--port", "0", env=env)
        assert code == 2, err
        line = one_line(err)
        assert f"this chathub needs {head_revision()}" in line, line
        assert "run `chathub db upgrade`" in line
        assert (f"is at {revision}" if revision else "is empty") in line
    finally:
        await drop_pg_database(name)


async def test_serve_starts_when_the_database_cannot_be_reached_yet(tmp_path: Path) -> None:
    """The schema cannot be checked: the server starts anyway (it waits for
    the database; /readyz says it is not ready)."""
    url = f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{closed_port()}/x"
    env = {
        "CHATHUB_DATA_DIR": str(tmp_path),
        "CHATHUB_DATABASE_URL": url,
        "CHATHUB_JWT_SECRET": "s" * 40,
        "CHATHUB_LLM": "scripted://",
        "CHATHUB_LOG_FORMAT": "text",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    proc = await asyncio.create_subprocess_exec(
        str(CHATHUB), "serve", "--port", "0",
        env=clean | env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stderr.readline()).decode():
                seen.append(line)
                if "Application startup complete" in line:
                    break
    finally:
        proc.terminate()
        await proc.wait()
    assert any("Application startup complete" in line for line in seen), seen
    assert any("cannot check the database schema now" in line for line in seen), seen


async def test_help_is_plain_text(tmp_path: Path) -> None:
    code, out, _ = await run(str(CHATHUB), "--help", env={"CHATHUB_DATA_DIR": str(tmp_path)})
    assert code == 0 and "``" not in out and "serve" in out, out
