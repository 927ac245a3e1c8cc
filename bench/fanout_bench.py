"""Fan-out benchmark: one session's reply streamed to N sockets spread over two
chathub instances that share Redis and PostgreSQL.

    .venv/bin/python bench/fanout_bench.py          # full run, writes scaleout_results.md
    .venv/bin/python bench/fanout_bench.py --quick  # a small run, printed only

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and Redis on
127.0.0.1:6379; a database of its own is created and dropped. Loopback only.

Set-up, per configuration (a stream rate R in deltas per second):

* two ``python -m chathub serve`` instances, A and B, on one fresh PostgreSQL
  database and the shared Redis, with ``CHATHUB_LLM=scripted://?chunk=4&rate=R``
  streaming a fixed text of ``R * --seconds`` four-character chunks (at most
  1000: the chat mode caps a reply at 4096 characters), ``CHATHUB_COALESCE_MS=0``
  (one chunk, one ``reply.delta``), no rate limits, a send queue of 65536
  frames (so that lag shows as latency rather than as slow-client closes);
* a client process (``client`` subcommand) opens N sockets, alternately to A
  and B, authenticates each with the bootstrap API key (``Authorization``
  header, no permessage-deflate offered) and joins all of them to one session;
  then socket 0 (on A) sends one ``message.send``. Every socket, those on A
  included, receives the reply through Redis: the session log publishes each
  event on one pub/sub channel that every instance reads.
* a monitor process (``monitor`` subcommand) subscribes to that channel
  (``chathub:events``) itself, with nothing else to do, and records when it
  receives each ``reply.delta`` of the session.

The client is a minimal RFC 6455 client on an asyncio protocol (on uvloop):
it reads the server's frames straight from the byte stream and, for a delta,
takes only its ``seq``; every frame in one read gets the time of that read.

Latency, per delivered frame: ``client receive time - monitor receive time``
of the same ``seq`` (``time.monotonic()``, CLOCK_MONOTONIC, one clock for all
processes of the host). This is the fan-out path itself: Redis pub/sub to each
instance, the hub, the socket's send queue, the instance's event loop, the
kernel, and the client's own read. It does not include the provider or the
append (both happen before the publication). As a cross-check the schedule is
used too: the scripted model emits chunk k at ``t0 + k/R``, so
``receive - (t0 + k/R)``, with ``t0`` the monitor's time of the first delta,
is the lag behind the model's schedule, generation included.

Throughput: all ``reply.delta`` frames received by all sockets, divided by
the time from the first to the last one received. CPU: user+system seconds of
each process over the same window (``/proc/<pid>/stat``), as a share of one
core.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "scaleout_results.md"
PY = sys.executable
REDIS_URL = os.environ.get("CHATHUB_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("CHATHUB_BENCH_PG", "postgres@127.0.0.1:5432")
JWT_SECRET = "bench-secret-" + "y" * 40
CHUNK = 4
MAX_CHUNKS = 1000
CHANNEL = "chathub:events"

DELTA = b'{"type":"reply.delta"'
COMPLETED = b'{"type":"reply.completed"'
FAILED = b'{"type":"reply.failed"'
SEQ = b'"seq":'


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """In a child: SIGKILL when the benchmark process dies, and a high fd limit."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    raise_fd_limit()


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def busy_cores() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / tick, sum(ticks) / tick


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    return (
        f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {version('uvicorn')}, "
        f"websockets {version('websockets')}, redis-py {version('redis')}"
    )


def update_section(name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of scaleout_results.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Scale-out benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    RESULTS.write_text(text)


class LeanSocket(asyncio.Protocol):
    """A minimal WebSocket client: handshake, masked frames out, the server's
    unmasked frames parsed in place. Deltas are recorded as (seq, time of the
    read that brought them); other frames go to ``inbox``."""

    def __init__(self, deflate: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.seqs = array("q")
        self.times = array("d")
        self.error: str | None = None
        self.deflate = deflate
        self.negotiated = ""
        self._inflater: Any = None
        self._key = base64.b64encode(os.urandom(16)).decode()

    @classmethod
    async def open(
        cls, port: int, token: str, *, deflate: bool = False, timeout: float = 30
    ) -> LeanSocket:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, sock = await loop.create_connection(lambda: cls(deflate), "127.0.0.1", port)
            ext = (
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                if deflate
                else ""
            )
            assert sock.transport is not None
            sock.transport.write(
                (
                    f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {sock._key}\r\n"
                    f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n{ext}\r\n"
                ).encode()
            )
            await sock.opened
            welcome = json.loads(await sock.inbox.get())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome}")
        return sock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.done.done():
            self.error = self.error or "connection closed"
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.opened.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            accept = base64.b64encode(
                hashlib.sha1((self._key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            if not head.startswith("HTTP/1.1 101") or accept not in head:
                self.opened.set_exception(ConnectionError(f"handshake refused: {head[:200]}"))
                return
            for line in head.split("\r\n"):
                if line.lower().startswith("sec-websocket-extensions:"):
                    self.negotiated = line.split(":", 1)[1].strip()
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1:
                if b0 & 0x40:  # RSV1: compressed (only the idle benchmark negotiates it)
                    self.inbox.put_nowait(self._inflate(bytes(buf[start:end])))
                elif buf.startswith(DELTA, start, end):
                    i = buf.find(SEQ, start, end) + len(SEQ)
                    j = buf.find(b",", i, end)
                    self.seqs.append(int(buf[i:j]))
                    self.times.append(now)
                elif buf.startswith(COMPLETED, start, end) or buf.startswith(FAILED, start, end):
                    if buf.startswith(FAILED, start, end):
                        self.error = bytes(buf[start:end][:300]).decode()
                    if not self.done.done():
                        self.done.set_result(None)
                else:
                    self.inbox.put_nowait(bytes(buf[start:end]))
            elif opcode == 9:  # ping: answer, or uvicorn's keepalive closes us
                self.write(0xA, bytes(buf[start:end]))
            elif opcode == 8:
                self.error = self.error or f"closed by the server: {bytes(buf[start:end])!r}"
                if self.transport is not None:
                    self.transport.close()
        if pos:
            del buf[:pos]

    def _inflate(self, payload: bytes) -> bytes:
        """permessage-deflate with context takeover: one inflater per socket."""
        if self._inflater is None:
            import zlib

            self._inflater = zlib.decompressobj(-15)
        data: bytes = self._inflater.decompress(payload + b"\x00\x00\xff\xff")
        return data

    def write(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None
        self.transport.write(head + mask + masked)

    def send(self, frame: dict[str, Any]) -> None:
        self.write(1, json.dumps(frame).encode())

    async def request(self, frame: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        self.send(frame)
        async with asyncio.timeout(timeout):
            while True:
                got: dict[str, Any] = json.loads(await self.inbox.get())
                if got.get("id") == frame.get("id"):
                    return got

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.write(8, (1000).to_bytes(2, "big"))
            self.transport.close()


async def open_one(ports: list[int], token: str, i: int, *, deflate: bool = False) -> LeanSocket:
    """Socket ``i``, on ``ports[i % len(ports)]``; retried on a refused open."""
    for attempt in range(3):
        try:
            return await LeanSocket.open(ports[i % len(ports)], token, deflate=deflate)
        except (OSError, ConnectionError, TimeoutError):
            if attempt == 2:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def open_many(
    ports: list[int], token: str, count: int, *, deflate: bool = False, parallel: int = 100
) -> list[LeanSocket]:
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> LeanSocket:
        async with gate:
            return await open_one(ports, token, i, deflate=deflate)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def join_all(
    socks: list[LeanSocket],
    session_ids: list[str],
    reopen: Any,
    parallel: int = 20,
) -> int:
    """Join every socket (``parallel`` at a time); a socket the server closes
    instead of answering is opened again with ``reopen(i)`` and retried.
    Returns how many were retried. Bursts are kept small on purpose: more
    than about 100 Redis commands in flight on one instance fail there (see
    tests/scaleout/test_bursts.py), and this benchmark measures fan-out."""
    gate = asyncio.Semaphore(parallel)
    retried = 0

    async def one(i: int) -> None:
        nonlocal retried
        async with gate:
            sid = session_ids[i % len(session_ids)]
            for attempt in range(5):
                try:
                    ack = await socks[i].request(
                        {"type": "join", "session_id": sid, "id": f"j{i}"}, timeout=10
                    )
                    if ack.get("type") == "ack":
                        return
                except TimeoutError:
                    if not socks[i].done.done():
                        raise
                retried += 1
                socks[i].close()
                await asyncio.sleep(0.1 * (attempt + 1))
                socks[i] = await reopen(i)
            raise RuntimeError(f"socket {i} could not join")

    await asyncio.gather(*(one(i) for i in range(len(socks))))
    return retried


# ---------------------------------------------------------------------------
# services: database and chathub instances
# ---------------------------------------------------------------------------


async def create_database() -> tuple[str, str]:
    import asyncpg  # type: ignore[import-untyped]

    user, _, host_port = PG.partition("@")
    host, _, port = host_port.partition(":")
    name = f"chathub_bench_{os.getpid()}_{os.urandom(3).hex()}"
    conn = await asyncpg.connect(host=host, port=int(port), user=user, database="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, f"postgresql+asyncpg://{user}@{host}:{port}/{name}"


async def drop_database(name: str) -> None:
    import asyncpg

    user, _, host_port = PG.partition("@")
    host, _, port = host_port.partition(":")
    conn = await asyncpg.connect(host=host, port=int(port), user=user, database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def chathub_env(database_url: str, data_dir: Path, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "jwt_secret": JWT_SECRET,
        "data_dir": data_dir,
        "llm": "scripted://",
        "coalesce_ms": 0,
        "ws_send_queue": 65536,
        "rate_user_messages": 0,
        "rate_team_messages": 0,
        "rate_user_tokens": 0,
        "rate_team_tokens": 0,
        # One member holds every socket and creates every session.
        "rate_user_sessions": 0,
        "ws_max_per_member": 0,
        "log_level": "warning",
    }
    values.update(settings)
    env.update({f"CHATHUB_{k.upper()}": str(v) for k, v in values.items()})
    return env


def cli(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        [PY, "-m", "chathub", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode:
        raise RuntimeError(f"chathub {args} failed: {out.stderr[-2000:]}")
    return out.stdout


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "chathub", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def rest(url: str, path: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


def redis_pid() -> int | None:
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_URL)
        pid = int(client.info("server")["process_id"])
        client.close()
        return pid
    return None


# ---------------------------------------------------------------------------
# monitor: the reference time of each event
# ---------------------------------------------------------------------------


def run_monitor(args: argparse.Namespace) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(CHANNEL)
    while True:  # wait for Redis to confirm
        message = pubsub.get_message(timeout=5)
        if message and message["type"] == "subscribe":
            break
    print("READY", flush=True)
    target = args.session.encode()
    seen: dict[int, tuple[float, int]] = {}  # seq -> (time, index of its last chunk)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if not message or message["type"] != "message":
            continue
        now = time.monotonic()
        raw_seq, kind, session, frame = message["data"].split(b"\n", 3)
        if session != target:
            continue
        if kind == b"reply.delta":
            # A delta may carry several chunks; it is due when its last one is.
            seen[int(raw_seq)] = (now, chunk_index(json.loads(frame)["text"].split()[-1]))
        elif kind in (b"reply.completed", b"reply.failed"):
            break
    Path(args.out).write_text(json.dumps(seen))
    return 0


# ---------------------------------------------------------------------------
# client: N sockets, one reply
# ---------------------------------------------------------------------------


def read_monitor(path: Path, wait_s: float = 10) -> dict[int, tuple[float, int]]:
    """The monitor's record, once it has written it: seq -> (time, chunk)."""
    deadline = time.monotonic() + wait_s
    while not (path.exists() and path.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {int(k): (v[0], v[1]) for k, v in json.loads(path.read_text()).items()}


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    ports = [int(p) for p in args.ports.split(",")]
    pids = {k: int(v) for k, v in (kv.split("=") for kv in args.pids.split(","))}
    t_setup = time.monotonic()
    socks = await open_many(ports, args.key, args.sockets)
    rejoined = await join_all(socks, [args.session], lambda i: open_one(ports, args.key, i))
    setup_s = time.monotonic() - t_setup
    pids["client"] = os.getpid()
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    host0 = busy_cores()
    t0 = time.monotonic()
    ack = await socks[0].request(
        {
            "type": "message.send",
            "session_id": args.session,
            "client_msg_id": "bench",
            "content": "go",
            "id": "send",
        }
    )
    if ack.get("type") != "ack":
        raise RuntimeError(f"send failed: {ack}")
    timed_out = 0
    try:
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(s.done for s in socks))
    except TimeoutError:
        timed_out = sum(not s.done.done() for s in socks)
    t1 = time.monotonic()
    cpu1 = {name: cpu_s(pid) for name, pid in pids.items()}
    host1 = busy_cores()
    for sock in socks:
        sock.close()

    monitored = await asyncio.to_thread(read_monitor, Path(args.monitor_out))
    published = {seq: t for seq, (t, _) in monitored.items()}
    # The model's schedule: chunk k is due at t0 + k / rate; t0 from the first delta.
    first_seq = min(monitored)
    t0 = monitored[first_seq][0] - monitored[first_seq][1] / args.rate
    due = {seq: t0 + k / args.rate for seq, (_, k) in monitored.items()}
    latency: list[float] = []
    behind: list[float] = []
    recv_first, recv_last, frames, missing = float("inf"), 0.0, 0, 0
    for sock in socks:
        got = set()
        for seq, t in zip(sock.seqs, sock.times, strict=True):
            got.add(seq)
            frames += 1
            if seq in published:
                latency.append(t - published[seq])
                behind.append(t - due[seq])
        missing += len(set(published) - got)
        if sock.times:
            recv_first = min(recv_first, sock.times[0])
            recv_last = max(recv_last, sock.times[-1])
    generation = [t - due[s] for s, t in published.items()]
    span = max(1e-9, recv_last - recv_first)
    window = t1 - t0
    return {
        "sockets": len(socks),
        "rate": args.rate,
        "deltas_published": len(published),
        "frames": frames,
        "missing": missing,
        "errors": sum(1 for s in socks if s.error),
        "timed_out": timed_out,
        "setup_s": round(setup_s, 1),
        "rejoined": rejoined,
        "span_s": round(span, 2),
        "frames_per_s": round(frames / span),
        "offered_per_s": round(len(socks) * args.rate),
        "latency_ms": {f"p{q:g}": round(pct(latency, q) * 1000, 1) for q in (50, 90, 99, 99.9)}
        | {"max": round(max(latency) * 1000, 1)},
        "behind_schedule_ms": {f"p{q}": round(pct(behind, q) * 1000, 1) for q in (50, 99)},
        "generation_lag_ms": {f"p{q}": round(pct(generation, q) * 1000, 1) for q in (50, 99)},
        "cpu": {k: round((cpu1[k] - cpu0[k]) / window, 2) for k in cpu0}
        | {
            "host": round((host1[0] - host0[0]) / window, 2),
            "others": round(
                (host1[0] - host0[0] - sum(cpu1[k] - cpu0[k] for k in cpu0)) / window, 2
            ),
        },
        "loadavg": os.getloadavg()[0],
        "cpu_window_s": round(window, 2),
    }


def run_client(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(client_main(args))
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------


def chunk_word(k: int) -> str:
    """Chunk ``k`` as three letters and a space ("aaa ", "aab ", ...): no
    digits, so that no output guardrail (phone numbers, cards) rewrites it."""
    return "".join(chr(97 + (k // 26**p) % 26) for p in (2, 1, 0)) + " "


def chunk_index(word: str) -> int:
    return sum((ord(c) - 97) * 26**p for c, p in zip(word, (2, 1, 0), strict=True))


def reply_text(chunks: int) -> str:
    return "".join(chunk_word(k) for k in range(chunks))


def one_config(
    database_url: str, key: str, tmp: Path, sockets: int, rate: float, seconds: float
) -> dict[str, Any]:
    chunks = min(MAX_CHUNKS, int(rate * seconds))
    llm = "scripted://?" + urlencode({"text": reply_text(chunks), "chunk": CHUNK, "rate": rate})
    tag = f"{sockets}x{rate:g}"
    servers = [
        Server(chathub_env(database_url, tmp / f"data-{tag}-{n}", llm=llm), tmp / f"{tag}-{n}.log")
        for n in "AB"
    ]
    procs: list[subprocess.Popen[str]] = []
    try:
        for server in servers:
            server.wait_ready()
        session = rest(servers[0].url, "/chat/sessions", key, {"title": tag})["id"]
        monitor_out = tmp / f"monitor-{tag}.json"
        timeout = chunks / rate + 60
        monitor = subprocess.Popen(
            [PY, __file__, "monitor", "--session", session, "--out", str(monitor_out),
             "--timeout", str(timeout)],
            stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        procs.append(monitor)
        assert monitor.stdout is not None
        if monitor.stdout.readline().strip() != "READY":
            raise RuntimeError("monitor did not start")
        pids = [f"{n}={s.proc.pid}" for n, s in zip("AB", servers, strict=True)]
        rpid = redis_pid()
        if rpid:
            pids.append(f"redis={rpid}")
        client = subprocess.Popen(
            [PY, __file__, "client", "--ports", ",".join(str(s.port) for s in servers),
             "--key", key, "--session", session, "--sockets", str(sockets),
             "--rate", str(rate), "--monitor-out", str(monitor_out),
             "--pids", ",".join(pids), "--timeout", str(timeout)],
            stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        procs.append(client)
        out, _ = client.communicate(timeout=timeout + 120)
        if client.returncode:
            raise RuntimeError(f"client failed ({client.returncode}): {out[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["chunks"] = chunks
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for server in servers:
            server.stop()


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "## Fan-out through Redis: one session's stream to many sockets on two instances",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; loopback only; two chathub "
        "instances, Redis and PostgreSQL on the same host as the client and the monitor.",
        "`.venv/bin/python bench/fanout_bench.py` "
        f"(sockets: {args.sockets}; rates: {args.rates}; {args.seconds:g} s of stream, "
        f"at most {MAX_CHUNKS} deltas; {args.runs} runs of each, every run shown). Method: "
        "see the docstring of bench/fanout_bench.py. The host is shared: the last column is "
        "the CPU that other processes took during the run.",
        "",
        "| sockets | deltas/s per socket | offered frames/s | delivered frames/s | "
        "latency p50 / p90 / p99 / max (ms) | behind schedule p50 / p99 (ms) | "
        "generation lag p99 (ms) | missing | CPU A / B / redis / client (cores) | "
        "CPU of other processes (cores) |",
        "| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        lat, beh, gen, cpu = (
            r["latency_ms"],
            r["behind_schedule_ms"],
            r["generation_lag_ms"],
            r["cpu"],
        )
        lines.append(
            f"| {r['sockets']} | {r['rate']:g} | {r['offered_per_s']:,} | "
            f"{r['frames_per_s']:,} | {lat['p50']} / {lat['p90']} / {lat['p99']} / "
            f"{lat['max']} | {beh['p50']} / {beh['p99']} | {gen['p99']} | {r['missing']} | "
            f"{cpu.get('A', 0)} / {cpu.get('B', 0)} / {cpu.get('redis', 0)} / "
            f"{cpu.get('client', 0)} | {cpu.get('others', 0)} |"
        )
    return "\n".join(lines) + "\n"


def main_run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    rates = [float(r) for r in args.rates.split(",")]
    results = []
    name, url = asyncio.run(create_database())
    try:
        with tempfile.TemporaryDirectory(prefix="chathub-fanout-") as tmpdir:
            tmp = Path(tmpdir)
            env = chathub_env(url, tmp / "cli")
            cli(["db", "upgrade"], env)
            boot = cli(["admin", "bootstrap", "--team", "Bench", "--email", "b@bench.test"], env)
            key = json.loads(boot.strip().splitlines()[-1])["api_key"]
            for run in range(args.runs):
                for rate in rates:
                    print(f"run {run + 1}: {args.sockets} sockets, {rate:g} deltas/s", flush=True)
                    result = one_config(url, key, tmp, args.sockets, rate, args.seconds)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    finally:
        asyncio.run(drop_database(name))
    results.sort(key=lambda r: r["rate"])
    report = render(results, args)
    print(report)
    if args.write:
        update_section("fanout", report)
        print(f"written to {RESULTS}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    mon = sub.add_parser("monitor")
    mon.add_argument("--session", required=True)
    mon.add_argument("--out", required=True)
    mon.add_argument("--timeout", type=float, default=120)
    cl = sub.add_parser("client")
    for name in ("ports", "key", "session", "monitor-out", "pids"):
        cl.add_argument(f"--{name}", required=True)
    cl.add_argument("--sockets", type=int, required=True)
    cl.add_argument("--rate", type=float, required=True)
    cl.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rates", default="25,50,100")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--runs", type=int, default=2, help="runs of every rate (the host is shared: all shown)"
    )
    parser.add_argument("--quick", action="store_true", help="100 sockets, 3 s, not written")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args()
    if args.cmd == "monitor":
        return run_monitor(args)
    if args.cmd == "client":
        return run_client(args)
    if args.quick:
        args.sockets, args.seconds, args.write = 100, 3.0, False
        args.rates, args.runs = "100", 1
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
