"""Transport benchmark of chathub's WebSocket hub against a bare Starlette socket.

    .venv/bin/python bench/hub_bench.py   # 3 runs of each configuration -> hub_results.md

Every run starts its server as a subprocess pinned to core 0 (``taskset -c 0``)
and its client as a second subprocess pinned to core 1, on loopback only:

* ``hub``: ``python -m chathub serve`` on the embedded SQLite default in a
  fresh temporary ``CHATHUB_DATA_DIR`` (team bootstrapped first with ``chathub
  admin bootstrap``), ``CHATHUB_LLM=scripted://?text=...&chunk=C&rate=0&burst=B``
  whose reply is exactly ``--tokens`` chunks, handed over ``--burst`` chunks per
  turn of the event loop as a provider's SDK does when the model streams faster
  than the server reads (``-per-token`` configurations: one chunk per turn,
  as if every token were a network read of its own), ``CHATHUB_COALESCE_MS`` 0 or 30, a send
  queue no client fills, rate limits off, log level warning. ``independent``:
  N sockets, each joined to its own session and sending one message, so N
  replies stream at once. ``fanout``: N sockets joined to one session, one of
  them sends, all receive the one reply. ``hub-off-unguarded``: as
  ``hub-off``, with the sessions in a team mode whose guardrail rules are all
  off, so that the output guardrail holds nothing back and every token is a
  frame: the hub's cost per frame apart from the guardrail.
* ``bare``: ``bench/bare_ws_server.py``, a Starlette endpoint on uvicorn with
  the same ``uvicorn.run`` arguments, sending the same number of pre-encoded
  frames of the same shape and size to each socket, back to back.

The client (the ``client`` subcommand of this file) connects, authenticates
and joins every socket, then times from the first ``message.send`` to the last
``reply.completed``: frames/s is the number of ``reply.delta`` frames received
over that time, tokens/s the characters received over it divided by the chunk
size. By default it is a minimal RFC 6455 client that counts frames as it
parses them, cheap enough not to be the bottleneck; rows marked "websockets
client" use the ``websockets`` asyncio client (one ``recv()`` per frame),
which on this machine is itself the limit against the bare server.

Each run does an untimed warm-up reply first. Each configuration runs
``--runs`` times on a fresh server, configurations interleaved; the median is
reported, with rates per second of server CPU beside the wall-clock ones
(other processes on the machine take turns on core 0). ``--profile DIR``
records the server with py-spy during the timed round of one more run per
configuration and summarises where its CPU went.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bare_ws_server import delta_frames, reply_text  # noqa: E402

PY = sys.executable
RUN_TIMEOUT_S = 45.0  # the client's budget for one run (setup, warm-up, timed round)
SERVER_START_TIMEOUT_S = 30.0
# The shipped "chat" mode caps a reply at max_output_tokens (1024) * 4 characters.
MAX_REPLY_CHARS = 1024 * 4

# What a team mode document copies from the shipped "chat" mode.
MODE_FIELDS = ("description", "system_prompt", "temperature", "max_output_tokens",
               "context_budget", "extraction")  # fmt: skip

DELTA = '{"type":"reply.delta"'
COMPLETED = '{"type":"reply.completed"'
FAILED = '{"type":"reply.failed"'
ERROR = '{"type":"error"'
TEXT_KEY = '"text":"'


# ---------------------------------------------------------------------------
# client (runs as its own process on core 1)
# ---------------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _proc_wait_s(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU
    (``/proc/PID/task/*/schedstat``): other processes taking the core."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat: with the processes'
    own CPU time, it shows how much other work shared the cores."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]
                out[name] = (sum(ticks) - idle, sum(ticks))
    return out


def _busy(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    out = {}
    for core, (busy0, total0) in before.items():
        busy1, total1 = after[core]
        out[core] = (busy1 - busy0) / max(1, total1 - total0)
    return out


@dataclass
class SocketResult:
    deltas: int = 0
    chars: int = 0
    first_delta: float = 0.0
    last_delta: float = 0.0
    done: float = 0.0
    error: str | None = None


class LeanSocket(asyncio.Protocol):
    """A minimal WebSocket client on a plain asyncio protocol: RFC 6455
    handshake, masked frames out (``websockets.frames.Frame``), and a
    hand-rolled parser for the server's unmasked frames that counts
    ``reply.delta`` frames without building a message object for each. Its
    cost per frame is a fraction of the server's, so it measures the server."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.completed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.result = SocketResult()
        self.streaming = False  # an error frame from now on fails the socket
        self._key = ""

    @classmethod
    async def open(cls, port: int, headers: dict[str, str]) -> LeanSocket:
        import base64

        loop = asyncio.get_running_loop()
        _, sock = await loop.create_connection(cls, "127.0.0.1", port)
        sock._key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {sock._key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        assert sock.transport is not None
        sock.transport.write(request.encode())
        await sock.opened
        return sock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.completed.done():
            self.result.error = self.result.error or "connection closed"
            self.completed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.opened.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            import base64
            import hashlib

            accept = base64.b64encode(
                hashlib.sha1((self._key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            if not head.startswith("HTTP/1.1 101") or accept not in head:
                self.opened.set_exception(ConnectionError(f"handshake refused: {head[:200]}"))
                return
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        res = self.result
        got_delta = False
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
            if opcode == 1:  # text (the servers never fragment)
                if buf.startswith(DELTA_B, start, end):
                    if not res.deltas:
                        res.first_delta = time.perf_counter()
                    got_delta = True
                    res.deltas += 1
                    # orjson puts "text" last and the bench text needs no escaping.
                    res.chars += end - buf.rfind(TEXT_KEY_B, start, end) - len(TEXT_KEY_B) - 2
                elif buf.startswith(COMPLETED_B, start, end):
                    res.done = time.perf_counter()
                    if not self.completed.done():
                        self.completed.set_result(None)
                elif buf.startswith(FAILED_B, start, end) or (
                    self.streaming and buf.startswith(ERROR_B, start, end)
                ):
                    res.done = time.perf_counter()
                    res.error = bytes(buf[start:end][:300]).decode()
                    if not self.completed.done():
                        self.completed.set_result(None)
                else:
                    self.inbox.put_nowait(bytes(buf[start:end]))
            elif opcode == 9:  # ping: answer so uvicorn's keepalive never closes us
                self._write(0xA, bytes(buf[start:end]))
            elif opcode == 8:
                res.error = res.error or f"closed by the server: {bytes(buf[start:end])!r}"
                if self.transport is not None:
                    self.transport.close()
        if got_delta:
            res.last_delta = time.perf_counter()
        if pos:
            del buf[:pos]

    def _write(self, opcode: int, payload: bytes) -> None:
        from websockets.frames import Frame, Opcode

        assert self.transport is not None
        self.transport.write(Frame(Opcode(opcode), payload).serialize(mask=True))

    async def send(self, frame: dict[str, Any]) -> None:
        self._write(1, json.dumps(frame).encode())

    async def recv(self) -> str:
        return (await self.inbox.get()).decode()

    def other_types(self) -> list[str]:
        """Types of the frames received but not read (for diagnostics)."""
        out = []
        while not self.inbox.empty():
            frame = json.loads(self.inbox.get_nowait())
            kind = str(frame.get("type"))
            if kind == "error":
                kind += f" {frame.get('code')}: {str(frame.get('detail'))[:200]}"
            if kind != "heartbeat":
                out.append(kind)
        return out

    async def finish(self) -> None:
        await self.completed

    async def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self._write(8, (1000).to_bytes(2, "big"))
            self.transport.close()


class WebsocketsSocket:
    """The same socket through the ``websockets`` asyncio client: every frame
    becomes a message read with ``recv()``. Its cost per frame is about the
    bare server's, so against the bare server it measures itself."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.result = SocketResult()

    @classmethod
    async def open(cls, port: int, headers: dict[str, str]) -> WebsocketsSocket:
        import websockets

        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers=headers,
            max_size=None,
            compression=None,
            ping_interval=None,
            max_queue=4096,
            open_timeout=20,
        )
        return cls(ws)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self) -> str:
        return str(await self.ws.recv())

    def other_types(self) -> list[str]:
        return []

    async def finish(self) -> None:
        res, recv, perf = self.result, self.ws.recv, time.perf_counter
        while True:
            raw = await recv()
            if raw.startswith(DELTA):
                res.last_delta = perf()
                if not res.deltas:
                    res.first_delta = res.last_delta
                res.deltas += 1
                res.chars += len(raw) - raw.rfind(TEXT_KEY) - len(TEXT_KEY) - 2
            elif raw.startswith(COMPLETED):
                res.done = perf()
                break
            elif raw.startswith((FAILED, ERROR)):
                res.done = perf()
                res.error = raw[:300]
                break

    async def close(self) -> None:
        await self.ws.close()


DELTA_B, COMPLETED_B, FAILED_B, ERROR_B, TEXT_KEY_B = (
    s.encode() for s in (DELTA, COMPLETED, FAILED, ERROR, TEXT_KEY)
)
CLIENTS: dict[str, Any] = {"lean": LeanSocket, "websockets": WebsocketsSocket}


async def _open(kind: str, port: int, headers: dict[str, str], session_ids: list[str]) -> list[Any]:
    async def one(session_id: str) -> Any:
        sock = await CLIENTS[kind].open(port, headers)
        welcome = json.loads(await sock.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome}")
        await sock.send({"type": "join", "session_id": session_id, "id": "j"})
        while True:
            frame = json.loads(await sock.recv())
            if frame.get("id") == "j":
                if frame["type"] != "ack":
                    raise RuntimeError(f"join failed: {frame}")
                return sock

    return list(await asyncio.gather(*(one(s) for s in session_ids)))


def _ready_then_go(ready_file: str, go_file: str) -> None:
    Path(ready_file).touch()
    while not Path(go_file).exists():
        time.sleep(0.02)


async def _round(
    kind: str,
    port: int,
    headers: dict[str, str],
    session_ids: list[str],
    senders: set[int],
    tag: str,
    server_pid: int,
    deadline: float,
    ready_file: str = "",
    go_file: str = "",
) -> dict[str, Any]:
    async with asyncio.timeout_at(deadline):
        socks = await _open(kind, port, headers, session_ids)
        if ready_file:  # the profiler starts now; go when it is attached
            await asyncio.to_thread(_ready_then_go, ready_file, go_file)

    async def run(i: int, sock: Any) -> None:
        sock.streaming = True
        if i in senders:
            await sock.send(
                {
                    "type": "message.send",
                    "session_id": session_ids[i],
                    "client_msg_id": f"{tag}-{i}",
                    "content": "Tell me a long story.",
                }
            )
        await sock.finish()

    try:
        cores0 = _core_times()
        srv0, cpu0 = _proc_cpu_s(server_pid), time.process_time()
        wait0 = _proc_wait_s(server_pid)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*(run(i, s) for i, s in enumerate(socks)))
        except TimeoutError:
            for sock in socks:
                res = sock.result
                if not res.done:
                    res.done = time.perf_counter()
                    res.error = (
                        f"no reply.completed in time: {res.deltas} deltas, {res.chars} chars; "
                        f"other frames: {sock.other_types()}"
                    )
        t1 = max(s.result.done for s in socks)
        srv1, cpu1 = _proc_cpu_s(server_pid), time.process_time()
        wait1 = _proc_wait_s(server_pid)
        cores = _busy(cores0, _core_times())
    finally:
        await asyncio.gather(*(s.close() for s in socks), return_exceptions=True)
    results = [s.result for s in socks]
    firsts = [r.first_delta for r in results if r.first_delta]
    first = min(firsts) if firsts else t1
    return {
        "sockets": len(socks),
        "frames": sum(r.deltas for r in results),
        "chars": sum(r.chars for r in results),
        "per_socket_frames": sorted({r.deltas for r in results}),
        "per_socket_chars": sorted({r.chars for r in results}),
        "errors": [r.error for r in results if r.error],
        "wall_s": t1 - t0,
        "stream_s": max(max(r.last_delta for r in results) - first, 1e-9),
        "first_delta_s": first - t0,
        "tail_s": t1 - max(r.last_delta for r in results),
        "server_cpu_s": sum(srv1) - sum(srv0),
        "server_sys_s": srv1[1] - srv0[1],
        "server_wait_s": wait1 - wait0,
        "client_cpu_s": cpu1 - cpu0,
        "core0_busy": cores.get("cpu0", 0.0),
        "core1_busy": cores.get("cpu1", 0.0),
    }


async def _client_main(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from chathub.llm.guardrails.policy import POLICY_RULES

    base = f"http://127.0.0.1:{args.port}"
    n, warm = args.sockets, args.warmup_sockets
    independent = args.mode == "independent"
    headers: dict[str, str] = {}
    if args.api_key:
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            r = await http.post("/auth/token", json={"api_key": args.api_key})
            r.raise_for_status()
            headers = {"Authorization": f"Bearer {r.json()['access_token']}"}

            body: dict[str, Any] = {}
            if args.unguarded:
                # A team mode like "chat" with every guardrail rule off: the
                # output guardrail then holds nothing back, and with
                # coalescing off every token is a frame of its own.
                chat = (await http.get("/modes/chat", headers=headers)).json()
                mode = {k: chat[k] for k in MODE_FIELDS if k in chat}
                mode["name"] = "unguarded"
                mode["guardrails"] = {"rules": dict.fromkeys(POLICY_RULES, "allow")}
                created = await http.post("/modes", json=mode, headers=headers)
                created.raise_for_status()
                body["mode"] = "unguarded"

            async def new_session(title: str) -> str:
                resp = await http.post(
                    "/chat/sessions", json={"title": title, **body}, headers=headers
                )
                resp.raise_for_status()
                return str(resp.json()["id"])

            warm_ids = [await new_session(f"warm-up {i}") for i in range(warm)]
            ids = [await new_session(f"bench {i}") for i in range(n if independent else 1)]
    else:  # bare server: any id will do
        warm_ids = [f"warm-{i}" for i in range(warm)]
        ids = [f"s-{i}" for i in range(n if independent else 1)]
    session_ids = ids if independent else ids * n
    senders = set(range(n)) if independent else {0}

    out: dict[str, Any] = {}
    deadline = asyncio.get_running_loop().time() + args.timeout
    if warm:
        warmup = await _round(
            args.client,
            args.port,
            headers,
            warm_ids,
            set(range(warm)),
            "w",
            args.server_pid,
            deadline,
        )
        out["warmup"] = {k: warmup[k] for k in ("frames", "wall_s", "errors")}
    out.update(
        await _round(
            args.client,
            args.port,
            headers,
            session_ids,
            senders,
            "m",
            args.server_pid,
            deadline,
            args.ready_file,
            args.go_file,
        )
    )
    return out


def client_command(args: argparse.Namespace) -> int:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        out_loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.Runner()
        out_loop = "asyncio"
    with runner:
        result = runner.run(_client_main(args))
    result["client_loop"] = out_loop
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def _kill(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc in _children:
        _children.remove(proc)


def _kill_all() -> None:
    for proc in list(_children):
        _kill(proc, grace=3.0)


def _on_signal(signum: int, _frame: Any) -> None:
    _kill_all()
    raise SystemExit(128 + signum)


def _spawn(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own, output to ``log``. A server is
    started in a folder of its own (``cwd``): ``python -m`` puts its working
    directory first on ``sys.path``, so run from the repository root it
    would import the work tree's chathub whatever PYTHONPATH says."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _children.append(proc)
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        url = f"http://127.0.0.1:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"server not healthy after {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
    )


CHATHUB_SRC: str | None = None
"""With ``--head`` or ``--rev``: a folder holding ``chathub/`` as committed, put
first on the servers' PYTHONPATH (the work tree may hold someone's unfinished
edits; an older revision is a baseline to compare with)."""
CHATHUB_REV = ""


def _clean_env() -> dict[str, str]:
    """This environment without any CHATHUB_* setting (no stray database or
    Redis URL); with ``--head``, the committed chathub first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    env["PYTHONUNBUFFERED"] = "1"
    if CHATHUB_SRC:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CHATHUB_SRC, env.get("PYTHONPATH")]))
    return env


def _git(*argv: str) -> str:
    """A read-only git command in the repository; '' when it fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.decode().rstrip()


def _code_state() -> str:
    head = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if CHATHUB_SRC:
        return f"chathub as committed at {CHATHUB_REV} (`git archive`)"
    changed = [line[3:] for line in _git("status", "--porcelain", "--", "chathub").splitlines()]
    if not changed:
        return f"chathub at {head}, work tree clean"
    return (
        f"chathub work tree at {head} with {len(changed)} uncommitted change(s): "
        + ", ".join(f"`{c}`" for c in changed[:12])
        + (" ..." if len(changed) > 12 else "")
    )


def _export(folder: Path, rev: str = "HEAD") -> None:
    """``git archive REV chathub`` into ``folder`` (reads the repository only)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "chathub"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True, timeout=60)


def codes_to_measure(
    baseline: str | None, src_dir: str
) -> tuple[dict[str, str], dict[str, str | None]]:
    """For a benchmark that compares revisions: the labels of the code to
    measure, and where each is (``None``: the work tree). With ``baseline``,
    that revision first, exported into ``src_dir``. Raises ValueError for a
    revision git does not know."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "chathub"))
    codes = {"work": f"work tree at {head}" + (" (uncommitted changes)" if dirty else "")}
    sources: dict[str, str | None] = {"work": None}
    if baseline:
        rev = _git("rev-parse", "--short", baseline)
        if not rev:
            raise ValueError(f"unknown revision {baseline!r}")
        _export(Path(src_dir), rev)
        codes = {"baseline": f"{rev} (baseline)", **codes}
        sources["baseline"] = src_dir
    return codes, sources


@dataclass(frozen=True)
class Config:
    name: str
    server: str  # "hub" | "bare"
    mode: str  # "independent" | "fanout"
    coalesce_ms: float = 0.0
    client: str = "lean"  # "lean" | "websockets"
    unguarded: bool = False  # sessions in a team mode with every guardrail rule off
    per_token: bool = False  # the scripted provider yields to the loop before every chunk


CONFIGS = {
    "bare": Config("bare Starlette endpoint", "bare", "independent"),
    "hub-off": Config("hub, coalescing off, 50 sessions", "hub", "independent", 0),
    "hub-off-unguarded": Config(
        "hub, coalescing off, 50 sessions, guardrail rules off",
        "hub",
        "independent",
        0,
        unguarded=True,
    ),
    "hub-off-per-token": Config(
        "hub, coalescing off, 50 sessions, a loop turn per token",
        "hub",
        "independent",
        0,
        per_token=True,
    ),
    "hub-off-unguarded-per-token": Config(
        "hub, coalescing off, 50 sessions, guardrail rules off, a loop turn per token",
        "hub",
        "independent",
        0,
        unguarded=True,
        per_token=True,
    ),
    "hub-off-fanout": Config("hub, coalescing off, fan-out (1 session)", "hub", "fanout", 0),
    "hub-on": Config("hub, coalescing 30 ms, 50 sessions", "hub", "independent", 30),
    "hub-on-fanout": Config("hub, coalescing 30 ms, fan-out (1 session)", "hub", "fanout", 30),
    "bare-websockets": Config(
        "bare Starlette endpoint, `websockets` client", "bare", "independent", client="websockets"
    ),
    "hub-off-websockets": Config(
        "hub, coalescing off, 50 sessions, `websockets` client",
        "hub",
        "independent",
        0,
        client="websockets",
    ),
}
DEFAULT_CONFIGS = list(CONFIGS)


def _loaded_libs(pid: int) -> list[str]:
    """Which of uvloop / httptools the running server has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [lib for lib in ("uvloop", "httptools") if f"/{lib}/" in maps]


def _scripted_url(text: str, chunk: int, burst: int) -> str:
    """The hub's provider: ``text`` in ``chunk``-character tokens at full
    speed, ``burst`` per turn of the event loop (left out when 1, which a
    revision from before the parameter also understands)."""
    url = f"scripted://?text={quote_plus(text)}&chunk={chunk}&rate=0"
    return url if burst == 1 else f"{url}&burst={burst}"


def run_once(
    cfg: Config, args: argparse.Namespace, profile_to: Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp:
        d = Path(tmp)
        port = _free_port()
        env = _clean_env()
        api_key = ""
        if cfg.server == "hub":
            text = reply_text(args.tokens, args.chunk)
            burst = 1 if cfg.per_token else args.burst
            env.update(
                {
                    "CHATHUB_DATA_DIR": str(d / "data"),
                    "CHATHUB_LLM": _scripted_url(text, args.chunk, burst),
                    "CHATHUB_COALESCE_MS": str(cfg.coalesce_ms),
                    "CHATHUB_WS_SEND_QUEUE": "100000",
                    "CHATHUB_LOG_LEVEL": "warning",
                    # 52 messages and 104k tokens a minute from one user: limits off.
                    "CHATHUB_RATE_USER_MESSAGES": "0",
                    "CHATHUB_RATE_TEAM_MESSAGES": "0",
                    "CHATHUB_RATE_USER_TOKENS": "0",
                    "CHATHUB_RATE_TEAM_TOKENS": "0",
                    # ... and one member holds every socket and creates every session.
                    "CHATHUB_RATE_USER_SESSIONS": "0",
                    "CHATHUB_WS_MAX_PER_MEMBER": "0",
                }
            )
            boot = subprocess.run(
                [PY, "-m", "chathub", "admin", "bootstrap", "--team", "Bench",
                 "--email", "bench@example.com"],
                env=env, cwd=d, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            if boot.returncode != 0:
                raise RuntimeError(f"bootstrap failed:\n{boot.stderr.decode()[-3000:]}")
            api_key = json.loads(boot.stdout.decode().strip().splitlines()[-1])["api_key"]
            cmd = ["taskset", "-c", "0", PY, "-m", "chathub", "serve",
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        else:
            cmd = ["taskset", "-c", "0", PY, str(HERE / "bare_ws_server.py"), "--port", str(port),
                   "--tokens", str(args.tokens), "--chunk", str(args.chunk)]  # fmt: skip
        log = d / "server.log"
        server = _spawn(cmd, env, log, cwd=d)
        spy: subprocess.Popen[bytes] | None = None
        try:
            _wait_healthy(port, server, log)
            libs = _loaded_libs(server.pid)
            client_cmd = [
                "taskset", "-c", "1", PY, str(Path(__file__).resolve()), "client",
                "--port", str(port), "--server-pid", str(server.pid),
                "--client", cfg.client, "--mode", cfg.mode, "--sockets", str(args.sockets),
                "--warmup-sockets", str(args.warmup_sockets), "--timeout", str(RUN_TIMEOUT_S),
            ]  # fmt: skip
            if api_key:
                client_cmd += ["--api-key", api_key]
            if cfg.unguarded:
                client_cmd.append("--unguarded")
            if profile_to is not None:  # sample the timed round only
                client_cmd += ["--ready-file", str(d / "ready"), "--go-file", str(d / "go")]
            with open(d / "client.out", "wb") as out, open(d / "client.err", "wb") as err:
                client = subprocess.Popen(
                    client_cmd, env=env, stdout=out, stderr=err, start_new_session=True
                )
            _children.append(client)
            try:
                if profile_to is not None:
                    while not (d / "ready").exists() and client.poll() is None:
                        time.sleep(0.02)
                    spy = _spawn(
                        ["taskset", "-c", "1", str(Path(PY).parent / "py-spy"), "record",
                         "--pid", str(server.pid), "--rate", "250", "--format", "raw",
                         "--gil", "-o", str(profile_to)],
                        env, d / "py-spy.log",
                    )  # fmt: skip
                    time.sleep(1.0)  # py-spy attaches
                    (d / "go").touch()
                client.wait(RUN_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"client took over {RUN_TIMEOUT_S + 5}s") from exc
            finally:
                _kill(client, grace=2)
            if client.returncode != 0:
                raise RuntimeError(
                    f"client failed ({client.returncode}):\n"
                    f"{(d / 'client.err').read_text()[-3000:]}\n"
                    f"server log:\n{log.read_text()[-2000:]}"
                )
            lines = (d / "client.out").read_text().strip().splitlines()
            result: dict[str, Any] = json.loads(lines[-1])
            result["server_libs"] = libs
            if spy is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(spy.pid, signal.SIGINT)
                spy.wait(30)
            return result
        finally:
            if spy is not None:
                _kill(spy)
            _kill(server)


def _check(cfg: Config, r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What is wrong with a run's numbers (every socket must see the whole reply)."""
    problems = list(r["errors"])
    want_chars = args.tokens * args.chunk
    if r["per_socket_chars"] != [want_chars]:
        problems.append(f"characters per socket {r['per_socket_chars']} != {want_chars}")
    return problems


def _frames_note(cfg: Config, r: dict[str, Any], args: argparse.Namespace) -> str:
    """With coalescing off every token should be its own frame; fewer frames
    mean something upstream of the coalescer merged tokens."""
    if cfg.server == "hub" and cfg.coalesce_ms == 0 and r["per_socket_frames"] != [args.tokens]:
        return (
            f"{cfg.name}: {r['per_socket_frames']} frames per socket for {args.tokens} tokens "
            "(tokens merged before the coalescer)"
        )
    return ""


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("uvicorn", "websockets", "uvloop", "httptools", "starlette", "fastapi", "orjson"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "not installed"
    return out


def _uvicorn_choice() -> str:
    """What uvicorn's "auto" resolves to here (chathub.cli passes no loop/http/ws)."""
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        return None

    config = uvicorn.Config(app, proxy_headers=True, ws_max_size=64 * 1024)
    config.load()
    loop = "uvloop" if config.get_loop_factory() is not None and _has("uvloop") else "asyncio"
    ws = config.ws_protocol_class.__name__ if config.ws_protocol_class else "none"
    return f"loop={loop}, http={config.http_protocol_class.__name__}, ws={ws}"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _fmt_k(value: float) -> str:
    return f"{value / 1000:,.1f}k"


def _figures(r: dict[str, Any], chunk: int) -> dict[str, float]:
    """A run's rates. ``*_cpu`` divides by the server process's CPU seconds
    instead of wall time: what one fully available core would deliver, which
    other work on the machine does not change."""
    tokens = r["chars"] / chunk
    cpu = max(r["server_cpu_s"], 1e-9)
    return {
        "fps": r["frames"] / r["wall_s"],
        "tps": tokens / r["wall_s"],
        "stream_tps": tokens / r["stream_s"],
        "us_per_frame": cpu / max(r["frames"], 1) * 1e6,
        "fps_cpu": r["frames"] / cpu,
        "tps_cpu": tokens / cpu,
        "share": r["server_cpu_s"] / r["wall_s"],
        "waited": r["server_wait_s"] / r["wall_s"],
        "sys": r["server_sys_s"] / cpu,
        "client": r["client_cpu_s"] / r["wall_s"],
        "first_ms": r["first_delta_s"] * 1000,
        "tail_ms": max(0.0, r["tail_s"] * 1000),
        "wall_s": r["wall_s"],
    }


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], command: str) -> str:
    rows = []
    med: dict[str, dict[str, float]] = {}
    for key, results in runs.items():
        cfg = CONFIGS[key]
        figs = [_figures(r, args.chunk) for r in results]
        m = {k: _median([f[k] for f in figs]) for k in figs[0]}
        med[key] = m
        rows.append(
            f"| {cfg.name} | **{_fmt_k(m['fps'])}** | **{_fmt_k(m['tps'])}** "
            f"| {' · '.join(_fmt_k(f['fps']) for f in figs)} | {m['wall_s']:.3f} "
            f"| {m['first_ms']:.0f} | {m['tail_ms']:.0f} | {_fmt_k(m['stream_tps'])} "
            f"| {m['share']:.0%} | {m['waited']:.0%} | {m['client']:.0%} "
            f"| {m['us_per_frame']:.1f} | {m['sys']:.0%} "
            f"| {_fmt_k(m['fps_cpu'])} | {_fmt_k(m['tps_cpu'])} |"
        )
    lines = [
        "# chathub WebSocket hub: transport benchmark",
        "",
        f"{args.sockets} sockets x {args.tokens} tokens ({args.chunk} characters each) per "
        "run; server pinned to core 0, client to core 1, loopback. "
        f"Median of {args.runs} runs per configuration, each on a fresh server after an "
        "untimed warm-up reply; configurations interleaved run by run.",
        "",
        "| configuration | frames/s | tokens/s | frames/s of each run | wall s "
        "| first delta ms | last delta to last completed ms | tokens/s first to last delta "
        "| server CPU | server waiting for core 0 | client CPU | server CPU µs per frame "
        "| of which kernel | frames per server CPU-s | tokens per server CPU-s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
        *rows,
        "",
        "- frames/s: `reply.delta` frames received by all sockets / wall s, the time from the "
        "first `message.send` to the last `reply.completed`. tokens/s: characters received / "
        "chunk size / wall s; with coalescing off one frame is one token.",
        "- first delta: from the first `message.send` to the first delta (storing the messages). "
        "Last delta to last completed: storing the finished replies before `reply.completed`. "
        "Tokens/s first to last delta leaves both out: streaming alone.",
        "- server CPU, client CPU: the process's CPU time / wall s (100 % = one core). "
        "Waiting for core 0: time the server's threads were runnable but not running "
        "(schedstat), i.e. another process (or another server thread) had the core. The last "
        "three columns divide by the server's CPU time instead of wall time: what one whole "
        "core delivers, whatever else ran on the machine (other test suites share it). "
        "Of which kernel: the server's system time (mostly TCP send on loopback) / its CPU time.",
        "- client: a minimal RFC 6455 client on a uvloop protocol that counts frames as it "
        "parses them (default), or the `websockets` asyncio client (one `recv()` per frame) "
        "where the row says so.",
        "",
    ]
    targets = []
    bare = med.get("bare")
    if bare:
        for key in OFF_TARGETS:
            if key in med:
                targets.append(_off_target(key, med[key], bare))
        for key, label in (("hub-on", "50 sessions"), ("hub-on-fanout", "fan-out")):
            if key in med:
                m = med[key]
                ok = "met" if m["tps"] > bare["fps"] else "NOT met"
                targets.append(
                    f"- hub tokens/s > bare frames/s (coalescing 30 ms, {label}): "
                    f"{_fmt_k(m['tps'])} vs {_fmt_k(bare['fps'])} "
                    f"= {m['tps'] / bare['fps']:.2f}x -> **{ok}** (first to last delta: "
                    f"{m['stream_tps'] / bare['fps']:.2f}x; per server CPU-s: "
                    f"{m['tps_cpu'] / bare['fps_cpu']:.2f}x)"
                )
    notes = sorted(
        {n for key, rs in runs.items() for r in rs if (n := _frames_note(CONFIGS[key], r, args))}
    )
    if notes:
        lines += [
            "Frames are not tokens in these runs (so compare tokens/s there):",
            "",
            *(f"- {n}" for n in notes),
            "",
        ]
    if targets:
        lines += ["## Targets", "", *targets, ""]
    v = _versions()
    libs = sorted({lib for rs in runs.values() for r in rs for lib in r["server_libs"]})
    lines += [
        "## Machine",
        "",
        f"- nproc: {os.cpu_count()} ({_cpu_model()}), {platform.system()} {platform.release()}",
        f"- Python {v['python']}; uvicorn {v['uvicorn']}, websockets {v['websockets']}, "
        f"uvloop {v['uvloop']}, httptools {v['httptools']}, starlette {v['starlette']}, "
        f"fastapi {v['fastapi']}, orjson {v['orjson']}",
        f"- uvicorn `auto` (chathub.cli passes no loop/http/ws) resolves to: {_uvicorn_choice()}; "
        f"native modules mapped in the running servers: {', '.join(libs) or 'none'}",
        f"- client loop: {next(iter(runs.values()))[0]['client_loop']}; no compression "
        "(the clients offer no permessage-deflate)",
        f"- load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        f"- code measured: {_code_state()}",
        "",
        "## Command",
        "",
        "```sh",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


OFF_TARGETS = (
    "hub-off",
    "hub-off-unguarded",
    "hub-off-fanout",
    "hub-off-per-token",
    "hub-off-unguarded-per-token",
)
"""The coalescing-off configurations held to 60 % of the bare endpoint."""


def _off_target(key: str, m: dict[str, float], bare: dict[str, float]) -> str:
    """The 60 % target's line for one coalescing-off configuration: frames/s
    where each token is a frame; tokens/s where the guardrail sent several
    tokens in a frame (counting its frames would count the merging against
    the hub), with its frames/s beside."""
    label = CONFIGS[key].name.removeprefix("hub, ")
    merged = abs(m["tps"] - m["fps"]) > 0.01 * m["tps"]
    what, got, got_cpu = ("tokens/s", m["tps"], m["tps_cpu"]) if merged else (
        "frames/s", m["fps"], m["fps_cpu"])  # fmt: skip
    ratio = got / bare["fps"]
    line = (
        f"- hub {what} >= 60 % of bare frames/s ({label}): {_fmt_k(got)} / "
        f"{_fmt_k(bare['fps'])} = {ratio:.1%} -> **{'met' if ratio >= 0.6 else 'NOT met'}** "
        f"(per server CPU-s: {got_cpu / bare['fps_cpu']:.1%})"
    )
    if merged:
        line += (
            f"; its frames carry {m['tps'] / m['fps']:.1f} tokens each, "
            f"{m['fps'] / bare['fps']:.0%} of bare in frames/s"
        )
    return line


def _wait_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (bounded) until both cores are mostly idle, so runs do not start
    in the middle of someone else's test suite; returns the busiest core's
    share over the last sample."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _core_times()
        time.sleep(0.5)
        busiest = max(_busy(before, _core_times()).values())
        if busiest <= threshold or time.monotonic() >= deadline:
            return busiest


def bench_command(args: argparse.Namespace) -> int:
    if args.tokens * args.chunk > MAX_REPLY_CHARS:
        print(
            f"--tokens x --chunk must be at most {MAX_REPLY_CHARS} characters "
            "(the chat mode's max_output_tokens cuts longer replies)",
            file=sys.stderr,
        )
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs two cores (server on core 0, client on core 1)", file=sys.stderr)
        return 2
    atexit.register(_kill_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.head or args.rev:
        global CHATHUB_SRC, CHATHUB_REV
        CHATHUB_REV = _git("rev-parse", "--short", args.rev or "HEAD")
        if not CHATHUB_REV:
            print(f"unknown revision {args.rev!r}", file=sys.stderr)
            return 2
        src = tempfile.mkdtemp(prefix="hub-bench-src-")
        atexit.register(shutil.rmtree, src, True)
        _export(Path(src), CHATHUB_REV)
        CHATHUB_SRC = src
    print(f"code: {_code_state()}", file=sys.stderr)
    frames, _ = delta_frames(args.tokens, args.chunk)
    print(f"bare frame: {len(frames[0])} bytes: {frames[0]}", file=sys.stderr)

    keys = args.configs or DEFAULT_CONFIGS
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    failed = False
    for i in range(args.runs):
        for key in keys:  # interleaved: a noisy minute hits every configuration alike
            cfg = CONFIGS[key]
            background = _wait_quiet(args.quiet_wait)
            started = time.monotonic()
            r = run_once(cfg, args)
            problems = _check(cfg, r, args)
            note = _frames_note(cfg, r, args)
            f = _figures(r, args.chunk)
            print(
                f"{key} run {i + 1}: {r['frames']} frames in {r['wall_s']:.3f}s = "
                f"{f['fps']:,.0f} frames/s, {f['tps']:,.0f} tokens/s (first to last delta "
                f"{f['stream_tps']:,.0f}; first delta {f['first_ms']:.0f} ms, last delta to "
                f"completed {f['tail_ms']:.0f} ms); server CPU "
                f"{f['share']:.0%} (+{f['waited']:.0%} waiting for the core), client CPU "
                f"{f['client']:.0%}; per server CPU-s "
                f"{f['fps_cpu']:,.0f} frames, {f['tps_cpu']:,.0f} tokens, "
                f"{f['us_per_frame']:.1f} µs per frame, {f['sys']:.0%} of it in the kernel "
                f"(busiest core before: {background:.0%}; {time.monotonic() - started:.1f}s)"
                + (f" PROBLEMS: {problems}" if problems else "")
                + (f" NOTE: {note}" if note else ""),
                file=sys.stderr,
            )
            failed = failed or bool(problems)
            runs[key].append(r)
    shown = ["DIR" if a == args.profile else a for a in sys.argv[1:]]  # no local paths
    command = ".venv/bin/python bench/hub_bench.py" + (
        " " + " ".join(shlex.quote(a) for a in shown) if shown else ""
    )
    text = report(args, runs, command)
    if args.profile:
        text += (
            "\n## Profiles\n\npy-spy (`record --gil --format raw`, 250 Hz) on one more run "
            "of each configuration; share of the samples taken while a server thread held "
            "the GIL, by part of the server (the first part named in the stack).\n\n"
            + profile_command(args)
        )
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


def profile_command(args: argparse.Namespace) -> str:
    """One more run of each ``--profile-configs`` under py-spy (``--gil``,
    raw output in ``--profile`` DIR); prints each summary and returns the
    per-part tables as markdown."""
    if not (Path(PY).parent / "py-spy").exists():
        print("py-spy is not installed in this venv: pip install py-spy", file=sys.stderr)
        return ""
    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for key in args.profile_configs:
        out = folder / f"{key}.raw"
        r = run_once(CONFIGS[key], args, profile_to=out)
        f = _figures(r, args.chunk)
        problems = _check(CONFIGS[key], r, args)
        head = (
            f"### {CONFIGS[key].name}\n\nThe profiled run (slowed by sampling): "
            f"{f['fps']:,.0f} frames/s, {f['tps']:,.0f} tokens/s, "
            f"{f['us_per_frame']:.1f} server CPU µs per frame"
            + (f"; PROBLEMS: {problems}" if problems else "")
            + f". Raw samples: `{Path(out).name}` in the profile folder.\n"
        )
        print(f"\n{head}\n{summarize_profile(out, top=args.profile_top)}", file=sys.stderr)
        sections.append(f"{head}\n{summarize_profile(out, parts_only=True)}\n")
    return "\n".join(sections)


# Where a sample goes: the first rule whose marker is in its stack (root to leaf).
PROFILE_BUCKETS = [
    ("database: SQLAlchemy + aiosqlite (send, finish, extraction)", ("sqlalchemy/", "aiosqlite/")),
    (
        "socket writer: Connection._write_loop -> Starlette send_text -> uvicorn -> write()",
        ("Connection._write_loop",),
    ),
    (
        "per delta: session log append -> Event.build -> hub fan-out -> socket send or queue",
        ("MemorySessionLog.append", "Replies._flush"),
    ),
    (
        "per token: output guardrail + coalescer (reply_stream.DeltaWriter, guardrails/)",
        ("reply_stream.py", "chathub/llm/guardrails/"),
    ),
    (
        "per token: scripted provider + stream_with_retry + Replies._pump",
        ("Replies._pump", "ScriptedProvider.stream", "stream_with_retry"),
    ),
    ("socket reader and frame handlers (chathub/handlers/ws.py)", ("chathub/handlers/ws.py",)),
    ("HTTP requests (REST setup: token, sessions)", ("httptools_impl.py",)),
]


def _bucket_of(stack: str, leaf: str) -> str:
    for bucket, markers in PROFILE_BUCKETS:
        if any(marker in stack for marker in markers):
            return bucket
    if leaf.startswith("Runner.run"):
        return "event loop (uvloop, C: epoll, callbacks, socket reads)"
    return "other"


def summarize_profile(path: Path, top: int = 30, parts_only: bool = False) -> str:
    """py-spy raw (collapsed) samples, taken only while a thread held the GIL:
    the share per part of the server (``PROFILE_BUCKETS``), then per
    function, self and inclusive."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    buckets: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        for name in set(frames):
            incl[name] = incl.get(name, 0) + count
        bucket = _bucket_of(stack, leaf)
        buckets[bucket] = buckets.get(bucket, 0) + count
    if not total:
        return "(no samples)"
    out = [f"{total} samples while holding the GIL", "", "| share | part |", "| ---: | --- |"]
    for name, n in sorted(buckets.items(), key=lambda kv: -kv[1]):
        out.append(f"| {n / total:.1%} | {name} |")
    if parts_only:
        return "\n".join(out)
    out += ["", "| self % | function |", "| ---: | --- |"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {n / total:.1%} | `{name}` |")
    out += ["", "| inclusive % | function |", "| ---: | --- |"]
    for name, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {n / total:.1%} | `{name}` |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    client = sub.add_parser("client", help="(internal) the measuring client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--server-pid", type=int, required=True)
    client.add_argument("--client", choices=sorted(CLIENTS), default="lean")
    client.add_argument("--ready-file", default="", help="touched before the timed round")
    client.add_argument("--go-file", default="", help="the timed round waits for this file")
    client.add_argument("--api-key", default="")
    client.add_argument("--mode", choices=["independent", "fanout"], default="independent")
    client.add_argument("--unguarded", action="store_true")
    client.add_argument("--sockets", type=int, default=50)
    client.add_argument("--warmup-sockets", type=int, default=2)
    client.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S)
    client.set_defaults(func=client_command)

    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=2, help="characters per token")
    parser.add_argument(
        "--burst",
        type=int,
        default=16,
        help="tokens the scripted provider hands over per turn of the event loop "
        "(the -per-token configurations: 1)",
    )
    parser.add_argument("--warmup-sockets", type=int, default=2)
    parser.add_argument(
        "--head",
        action="store_true",
        help="serve chathub as committed at HEAD, not the work tree (git archive to a temp dir)",
    )
    parser.add_argument(
        "--rev", help="serve chathub as committed at this revision (a baseline to compare with)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGS),
        help=f"default: {' '.join(DEFAULT_CONFIGS)}",
    )
    parser.add_argument("--output", default=str(HERE / "hub_results.md"), help="'' to not write")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="seconds to wait at most for idle cores before each run",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="also profile the server with py-spy into DIR"
    )
    parser.add_argument(
        "--profile-configs",
        nargs="+",
        default=["hub-off", "hub-off-fanout", "hub-on"],
        choices=sorted(CONFIGS),
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.set_defaults(func=bench_command)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
