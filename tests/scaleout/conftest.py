"""Scale-out tests on real processes: several ``python -m chathub serve``
instances sharing one PostgreSQL database and one Redis, no stickiness.

Each test module gets a database of its own (migrated with ``chathub db
upgrade``, a team bootstrapped with ``chathub admin bootstrap``); each test
starts the instances it needs through the ``cluster`` fixture, which stops
(and, failing that, kills) every one of them when the test ends. A child
also gets SIGKILL from the kernel if the test process itself dies, so no
server outlives a run.

Tests marked ``restarts`` stop and restart the shared Redis or PostgreSQL;
they are collected last.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from tests.harness import (
    JWT_SECRET,
    PG_HOST,
    PG_PORT,
    REDIS_URL,
    create_pg_database,
    drop_pg_database,
    pg_url,
)
from tests.wsclient import WsClient

PY = sys.executable
LEASE_TTL_S = 2.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 8.0

# The scripted model's reply: 100 five-character chunks ("w000 " ... "w099 "),
# one chunk per delta (no coalescing), 40 chunks a second: 2.5 s a reply, slow
# enough to disconnect, cancel or kill in the middle of it.
WORDS = 100
CHUNK = 5
RATE = 40.0


def script_text(words: int = WORDS) -> str:
    return "".join(f"w{i:03d} " for i in range(words))


FULL_TEXT = script_text()


def scripted_llm(text: str = FULL_TEXT, *, chunk: int = CHUNK, rate: float = RATE) -> str:
    return "scripted://?" + urlencode({"text": text, "chunk": chunk, "rate": rate})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "restarts: stops and restarts the shared Redis or PostgreSQL (destructive; runs last)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Destructive tests last (a stable sort: everything else keeps its order)."""
    items.sort(key=lambda item: item.get_closest_marker("restarts") is not None)


# -- services ---------------------------------------------------------------


def redis_address() -> tuple[str, int]:
    parts = urlsplit(REDIS_URL)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def redis_ping(timeout: float = 1.0) -> bool:
    """PING over a raw socket (no client library, no connection pool)."""
    try:
        with socket.create_connection(redis_address(), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def pg_ready() -> bool:
    result = subprocess.run(
        ["pg_isready", "-h", PG_HOST, "-p", str(PG_PORT), "-q"],
        check=False,
        timeout=10,
    )
    return result.returncode == 0


async def wait_until(
    probe: Callable[[], Any], *, timeout: float, every: float = 0.1, what: str = "condition"
) -> Any:
    """Await ``probe()`` (sync or async) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


# -- processes --------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """The child gets SIGKILL when the test process dies, however it dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_live: set[subprocess.Popen[bytes]] = set()


def spawn(
    args: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    finally:
        out.close()
    _live.add(proc)
    return proc


async def reap(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, timeout)
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 10)
    finally:
        _live.discard(proc)


@pytest.fixture(scope="session", autouse=True)
def _no_orphans() -> Iterator[None]:
    """Belt and braces: kill whatever a test failed to stop."""
    yield
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)
    _live.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chathub_env(database_url: str, data_dir: Path, **settings: Any) -> dict[str, str]:
    """A clean environment: the caller's minus every CHATHUB_ variable, plus
    the settings of a scale-out instance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "jwt_secret": JWT_SECRET,
        "data_dir": data_dir,
        "llm": scripted_llm(),
        "lease_ttl_s": LEASE_TTL_S,
        "coalesce_ms": 0,
        "rate_user_messages": 0,
        "rate_team_messages": 0,
        "rate_user_tokens": 0,
        "rate_team_tokens": 0,
        "rate_user_sessions": 0,
        "rate_user_upload_bytes": 0,
        "rate_team_upload_bytes": 0,
        "ws_max_per_member": 0,
        "extraction_debounce_s": 0.2,
        "log_level": "warning",
    }
    values.update(settings)
    for key, value in values.items():
        env[f"CHATHUB_{key.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    result = subprocess.run(
        [PY, "-m", "chathub", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"chathub {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@dataclass
class Instance:
    """One ``python -m chathub serve`` process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(f"{self.url}/readyz")
        return r.status_code, r.json()

    async def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)


def spawn_serve(name: str, env: dict[str, str], log: Path, cwd: Path, *args: str) -> Instance:
    """``python -m chathub serve`` (with ``args``) on a free port, its output
    to ``log``. ``cwd``: not the checkout: ``-m`` puts the working directory
    first on sys.path, and PYTHONPATH (a patched copy) should win over it."""
    port = free_port()
    proc = spawn(
        [PY, "-m", "chathub", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env=env,
        log=log,
        cwd=cwd,
    )
    return Instance(name, port, proc, log)


@dataclass
class Deployment:
    """The module's database, with a bootstrapped team, and a place for logs."""

    database_url: str
    team_id: str
    api_key: str
    tmp: Path

    def env(self, data_dir: Path, **settings: Any) -> dict[str, str]:
        return chathub_env(self.database_url, data_dir, **settings)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="module")
async def deployment(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    if not redis_ping():
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    try:
        name = await create_pg_database()
    except Exception as exc:  # not reachable, or refused us
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    tmp = tmp_path_factory.mktemp("scaleout")
    try:
        url = pg_url(name)
        env = chathub_env(url, tmp / "cli")
        await asyncio.to_thread(run_cli, ["db", "upgrade"], env, tmp)
        out = await asyncio.to_thread(
            run_cli,
            ["admin", "bootstrap", "--team", "Scale", "--email", "owner@scale.example"],
            env,
            tmp,
        )
        created = json.loads(out.strip().splitlines()[-1])
        yield Deployment(url, created["team_id"], created["api_key"], tmp)
    finally:
        with contextlib.suppress(Exception):
            await drop_pg_database(name)


@dataclass
class Cluster:
    deployment: Deployment
    instances: list[Instance] = field(default_factory=list)

    async def start(self, count: int, **settings: Any) -> list[Instance]:
        """``count`` more instances with these settings (CHATHUB_* lower
        case, e.g. ``llm=...``), each on a free port; waits for /readyz."""
        started = [self._spawn(len(self.instances) + i, settings) for i in range(count)]
        self.instances.extend(started)
        await asyncio.gather(*(i.wait_ready() for i in started))
        return started

    def _spawn(self, index: int, settings: dict[str, Any]) -> Instance:
        name = "ABCDEFGH"[index] if index < 8 else f"I{index}"
        data_dir = self.deployment.tmp / f"data-{name}-{os.urandom(3).hex()}"
        data_dir.mkdir(parents=True)
        return spawn_serve(
            name, self.deployment.env(data_dir, **settings), data_dir.with_suffix(".log"), data_dir
        )

    async def stop(self) -> None:
        await asyncio.gather(*(reap(i.proc) for i in self.instances), return_exceptions=True)

    def logs(self) -> str:
        return "\n".join(f"--- {i.name} (:{i.port}) ---\n{i.log_tail()}" for i in self.instances)


@pytest.fixture
async def cluster(deployment: Deployment) -> AsyncIterator[Cluster]:
    made = Cluster(deployment)
    try:
        yield made
    finally:
        await made.stop()
        # Shown with a failing test's output.
        print(made.logs())


# -- clients ----------------------------------------------------------------


async def new_session(instance: Instance, deployment: Deployment, title: str = "") -> str:
    async with httpx.AsyncClient(base_url=instance.url, timeout=15) as http:
        r = await http.post("/chat/sessions", json={"title": title}, headers=deployment.headers())
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


async def stored_messages(
    instance: Instance, deployment: Deployment, session_id: str
) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=instance.url, timeout=15) as http:
        r = await http.get(
            f"/chat/sessions/{session_id}/messages",
            params={"limit": 100},
            headers=deployment.headers(),
        )
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items


async def stored_reply(
    instance: Instance, deployment: Deployment, session_id: str, reply_id: str
) -> dict[str, Any]:
    for message in await stored_messages(instance, deployment, session_id):
        if message["id"] == reply_id:
            return message
    raise AssertionError(f"reply {reply_id} is not stored")


async def connect(instance: Instance, deployment: Deployment) -> WsClient:
    return await connect_to(instance, deployment.api_key)


async def connect_to(instance: Instance, api_key: str) -> WsClient:
    # Unbounded receive buffer: a socket the test is not reading must not
    # stall (and then time out) its closing handshake behind unread frames.
    return await WsClient.connect(instance.ws_url, api_key, max_queue=None, close_timeout=2)


async def join(client: WsClient, session_id: str, after_seq: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "join", "session_id": session_id}
    if after_seq is not None:
        frame["after_seq"] = after_seq
    ack = await client.request(frame)
    assert ack["type"] == "ack", ack
    return ack


async def send(client: WsClient, session_id: str, client_msg_id: str, content: str = "hi") -> str:
    """``message.send``; the reply's id."""
    ack = await client.request(
        {
            "type": "message.send",
            "session_id": session_id,
            "client_msg_id": client_msg_id,
            "content": content,
        }
    )
    assert ack["type"] == "ack" and ack["reply_id"], ack
    return str(ack["reply_id"])


def events(frames: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
    """The session events among ``frames`` (acks and pongs have no seq)."""
    return [f for f in frames if f.get("session_id") == session_id and "seq" in f]


def deltas(frames: list[dict[str, Any]], reply_id: str) -> str:
    return "".join(
        f["text"] for f in frames if f["type"] == "reply.delta" and f["reply_id"] == reply_id
    )


def ends(frames: list[dict[str, Any]], reply_id: str) -> list[dict[str, Any]]:
    return [
        f
        for f in frames
        if f["type"] in ("reply.completed", "reply.failed") and f.get("reply_id") == reply_id
    ]


async def count_deltas(client: WsClient, reply_id: str, n: int, timeout: float = 15) -> None:
    """Read until ``n`` deltas of ``reply_id`` have arrived in total."""

    def enough(_: dict[str, Any]) -> bool:
        got = [f for f in client.seen if f["type"] == "reply.delta" and f["reply_id"] == reply_id]
        return len(got) >= n

    if not enough({}):
        async with asyncio.timeout(timeout):
            await client.until(enough, timeout=timeout)


def assert_contiguous(evs: list[dict[str, Any]], first: int = 1) -> None:
    seqs = [e["seq"] for e in evs]
    assert seqs == list(range(first, first + len(seqs))), f"seq gaps or repeats: {seqs}"
