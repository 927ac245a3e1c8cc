"""Memory of idle sockets: N authenticated sockets, each joined to a session,
on one chathub instance; server RSS per socket.

    .venv/bin/python bench/idle_sockets_bench.py          # 10,000 sockets, writes
                                                               # bench/scaleout_results.md
    .venv/bin/python bench/idle_sockets_bench.py --quick  # 1,000 sockets, printed only

Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (the scale-out
configuration); a database of its own is created and dropped. Loopback only.

One ``python -m chathub serve`` instance (PostgreSQL, Redis, scripted model),
its file descriptor limit raised to the hard limit. A client process (the
lean client of bench/fanout_bench.py, on uvloop, its own fd limit raised too)
whose every socket offers ``permessage-deflate`` in its handshake, as
browsers do:

1. warms the server up: 200 sockets open, authenticate, join and close;
2. reads the server's ``VmRSS`` (``/proc/<pid>/status``) after 3 s of quiet;
3. opens N sockets (100 at a time), each authenticated by its
   ``Authorization`` header and joined to one of 100 sessions (20 joins at a
   time: bursts of Redis commands fail, see tests/scaleout/test_bursts.py);
4. after 5 s of quiet reads ``VmRSS`` again: ``(after - before) / N`` is the
   cost of one idle socket;
5. closes every socket and reads ``VmRSS`` after 5 s; then opens and joins
   N sockets again and reads it once more: memory kept after closing is
   reused by the next sockets, not leaked, when the second round stays level.

Run twice, on a fresh server each time: with the default settings, and with
``CHATHUB_WS_COMPRESSION=true``. uvicorn negotiates permessage-deflate
whenever a client offers it unless ``uvicorn.run`` gets
``ws_per_message_deflate=False`` (``--ws-per-message-deflate false`` on
uvicorn's command line); ``chathub serve`` passes
``ws_per_message_deflate=settings.ws_compression``. What each handshake
actually negotiated is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fanout_bench import (  # noqa: E402
    PY,
    Server,
    chathub_env,
    cli,
    create_database,
    die_with_parent,
    drop_database,
    join_all,
    machine,
    open_many,
    open_one,
    raise_fd_limit,
    rest,
    rss_kib,
    update_section,
)

SESSIONS = 100


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_fd_limit()
    if limit < args.sockets + 200:
        raise RuntimeError(f"fd limit {limit} is too low for {args.sockets} sockets")
    pid, ports = args.pid, [args.port]
    sessions = args.sessions.split(",")
    deflate = args.deflate

    def reopen(i: int) -> Any:
        return open_one(ports, args.key, i, deflate=deflate)

    warm = await open_many(ports, args.key, 200, deflate=deflate)
    await join_all(warm, sessions, reopen)
    for sock in warm:
        sock.close()
    del warm
    gc.collect()
    await asyncio.sleep(3)
    before = rss_kib(pid)

    t0 = time.monotonic()
    socks = await open_many(ports, args.key, args.sockets, deflate=deflate)
    opened_s = time.monotonic() - t0
    rejoined = await join_all(socks, sessions, reopen)
    joined_s = time.monotonic() - t0 - opened_s
    await asyncio.sleep(5)
    after = rss_kib(pid)
    alive = sum(not s.done.done() for s in socks)
    negotiated = {s.negotiated for s in socks}

    for sock in socks:
        sock.close()
    del socks
    await asyncio.sleep(5)
    released = rss_kib(pid)

    again = await open_many(ports, args.key, args.sockets, deflate=deflate)
    await join_all(again, sessions, reopen)
    await asyncio.sleep(5)
    second = rss_kib(pid)
    for sock in again:
        sock.close()
    return {
        "sockets": args.sockets,
        "alive": alive,
        "deflate_offered": deflate,
        "negotiated": sorted(negotiated),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_after_close_kib": released,
        "per_socket_kib": round((after - before) / args.sockets, 1),
        "kept_after_close_kib": released - before,
        "rss_second_round_kib": second,
        "open_s": round(opened_s, 1),
        "join_s": round(joined_s, 1),
        "rejoined": rejoined,
    }


def run_client(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(client_main(args))), flush=True)
    return 0


def one_run(url: str, key: str, tmp: Path, sockets: int, compression: bool) -> dict[str, Any]:
    tag = "compression" if compression else "default"
    settings = {"ws_compression": "true"} if compression else {}
    server = Server(chathub_env(url, tmp / f"data-{tag}", **settings), tmp / f"{tag}.log")
    try:
        server.wait_ready()
        sessions = [
            rest(server.url, "/chat/sessions", key, {"title": f"idle {i}"})["id"]
            for i in range(SESSIONS)
        ]
        client = subprocess.Popen(
            [PY, __file__, "client", "--port", str(server.port), "--pid", str(server.proc.pid),
             "--key", key, "--sessions", ",".join(sessions), "--sockets", str(sockets),
             "--deflate"],
            stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            out, _ = client.communicate(timeout=600)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(5)
        if client.returncode:
            raise RuntimeError(f"client failed: {out[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["server"] = "CHATHUB_WS_COMPRESSION=true" if compression else "defaults"
        return result
    finally:
        server.stop()


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "## Idle sockets: server memory per authenticated, joined socket",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; one chathub instance "
        "(PostgreSQL, Redis); `.venv/bin/python bench/idle_sockets_bench.py`. "
        "Method: see the docstring of bench/idle_sockets_bench.py. Target: at most 20 KiB "
        "per idle socket with compression off.",
        "",
        "| server | negotiated (every socket offered permessage-deflate) | "
        "sockets (alive at the end) | RSS before → after (MiB) | per socket (KiB) | "
        "after closing all (MiB) | after a second round of N (MiB) | open / join time (s) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        negotiated = ", ".join(f"`{n}`" for n in r["negotiated"] if n) or "none"
        lines.append(
            f"| {r['server']} | {negotiated} | "
            f"{r['sockets']:,} ({r['alive']:,}) | {r['rss_before_kib'] / 1024:.0f} → "
            f"{r['rss_after_kib'] / 1024:.0f} | {r['per_socket_kib']} | "
            f"{r['rss_after_close_kib'] / 1024:.0f} | {r['rss_second_round_kib'] / 1024:.0f} | "
            f"{r['open_s']} / {r['join_s']} |"
        )
    return "\n".join(lines) + "\n"


def main_run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    name, url = asyncio.run(create_database())
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="chathub-idle-") as tmpdir:
            tmp = Path(tmpdir)
            env = chathub_env(url, tmp / "cli")
            cli(["db", "upgrade"], env)
            boot = cli(["admin", "bootstrap", "--team", "Idle", "--email", "i@bench.test"], env)
            key = json.loads(boot.strip().splitlines()[-1])["api_key"]
            for compression in (False, True):
                print(f"{args.sockets} sockets, compression setting: {compression} ...", flush=True)
                result = one_run(url, key, tmp, args.sockets, compression)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        asyncio.run(drop_database(name))
    report = render(results)
    print(report)
    if args.write:
        update_section("idle", report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    cl = sub.add_parser("client")
    cl.add_argument("--port", type=int, required=True)
    cl.add_argument("--pid", type=int, required=True)
    cl.add_argument("--key", required=True)
    cl.add_argument("--sessions", required=True)
    cl.add_argument("--sockets", type=int, required=True)
    cl.add_argument("--deflate", action="store_true")
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 sockets, not written")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args()
    if args.cmd == "client":
        return run_client(args)
    if args.quick:
        args.sockets, args.write = 1000, False
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
