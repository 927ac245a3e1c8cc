"""What one chat turn costs the server apart from streaming: CPU and latency.

    .venv/bin/python bench/turn_bench.py                     # the work tree -> turn_results.md
    .venv/bin/python bench/turn_bench.py --baseline 3689e2b  # and that commit, alternating

Each run starts ``python -m chathub serve`` pinned to core 0 (``taskset -c
0``) on a fresh database: the embedded SQLite default in a temporary
``CHATHUB_DATA_DIR``, or a PostgreSQL database of its own (127.0.0.1:5432,
user postgres, created and dropped), with the scripted provider answering
every message with two tokens, rate limits off and extraction deferred past
the run. This process, on core 1, creates the sessions over REST, warms up
with 20 turns, then sends ``--turns`` messages one after another, each
``POST /chat/sessions/{id}/messages`` (JSON: it returns the finished reply)
on a session of its own. Measured: the server process's CPU time (user and
system, from /proc) per turn, and each turn's latency at the client.

One turn is the whole path but the tokens: authenticate, store the message
and the empty reply, read the prompt's history, run the reply task, store
the finished reply, answer. With ``--baseline REV`` the runs of the work tree
and of REV (``git archive``, first on the server's PYTHONPATH) alternate, so
both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fanout_bench import create_database, drop_database  # noqa: E402
from hub_bench import (  # noqa: E402
    PY,
    _clean_env,
    _cpu_model,
    _free_port,
    _kill,
    _kill_all,
    _on_signal,
    _proc_cpu_s,
    _spawn,
    _wait_healthy,
    codes_to_measure,
)

WARMUP_TURNS = 20
JWT_SECRET = "turn-bench-" + "x" * 40


@dataclass
class Run:
    code: str
    database: str
    cpu_ms: float
    latencies_ms: list[float]


def _server_cpu_s(pid: int) -> float:
    return sum(_proc_cpu_s(pid))


def run_once(code: str, src: str | None, database: str, turns: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="turn-bench-") as tmp:
        d = Path(tmp)
        env = _clean_env()
        if src:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        env.update(
            {
                "CHATHUB_DATA_DIR": str(d / "data"),
                "CHATHUB_LLM": "scripted://?text=ok+fine&chunk=4&rate=0",
                "CHATHUB_LOG_LEVEL": "warning",
                "CHATHUB_RATE_USER_MESSAGES": "0",
                "CHATHUB_RATE_TEAM_MESSAGES": "0",
                "CHATHUB_RATE_USER_TOKENS": "0",
                "CHATHUB_RATE_TEAM_TOKENS": "0",
                "CHATHUB_RATE_USER_SESSIONS": "0",
                "CHATHUB_WS_MAX_PER_MEMBER": "0",
                "CHATHUB_EXTRACTION_DEBOUNCE_S": "3600",
            }
        )
        pg_name = None
        if database == "postgresql":
            pg_name, env["CHATHUB_DATABASE_URL"] = asyncio.run(create_database())
            env["CHATHUB_JWT_SECRET"] = JWT_SECRET
            subprocess.run(
                [PY, "-m", "chathub", "db", "upgrade"],
                env=env, cwd=d, capture_output=True, timeout=120, check=True,
            )  # fmt: skip
        server = None
        try:
            boot = subprocess.run(
                [PY, "-m", "chathub", "admin", "bootstrap", "--team", "Bench",
                 "--email", "bench@example.com"],
                env=env, cwd=d, capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            api_key = json.loads(boot.stdout.decode().strip().splitlines()[-1])["api_key"]
            port = _free_port()
            log = d / "server.log"
            server = _spawn(
                ["taskset", "-c", "0", PY, "-m", "chathub", "serve",
                 "--host", "127.0.0.1", "--port", str(port)],
                env, log, cwd=d,
            )  # fmt: skip
            _wait_healthy(port, server, log)
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=30,
            ) as client:
                sessions = [
                    client.post("/chat/sessions", json={}).json()["id"]
                    for _ in range(WARMUP_TURNS + turns)
                ]

                def turn(session_id: str) -> float:
                    started = time.perf_counter()
                    r = client.post(
                        f"/chat/sessions/{session_id}/messages",
                        json={"client_msg_id": "m1", "content": "hello there"},
                    )
                    if r.status_code not in (200, 201) or r.json().get("status") == "failed":
                        raise RuntimeError(f"turn failed: {r.status_code} {r.text[:500]}")
                    return (time.perf_counter() - started) * 1000

                for session_id in sessions[:WARMUP_TURNS]:
                    turn(session_id)
                cpu_before = _server_cpu_s(server.pid)
                latencies = [turn(session_id) for session_id in sessions[WARMUP_TURNS:]]
                cpu_ms = (_server_cpu_s(server.pid) - cpu_before) * 1000 / turns
        finally:
            if server is not None:
                _kill(server)
            if pg_name is not None:
                asyncio.run(drop_database(pg_name))
    return Run(code, database, cpu_ms, latencies)


def report(runs: list[Run], args: argparse.Namespace, codes: dict[str, str]) -> str:
    lines = [
        "# chathub: what one chat turn costs apart from streaming",
        "",
        f"{args.turns} sequential turns per run (`POST /chat/sessions/{{id}}/messages`, a "
        "two-token scripted reply, a new session each), after 20 untimed ones; server "
        "pinned to core 0, this client on core 1, loopback. Median over runs; the "
        "latencies pool every turn of every run.",
        "",
        "| code | database | server CPU per turn (ms) | each run | latency median (ms) "
        "| latency p90 (ms) |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for database in args.databases:
        for label in codes:
            mine = [r for r in runs if r.code == label and r.database == database]
            if not mine:
                continue
            cpu = statistics.median(r.cpu_ms for r in mine)
            pooled = sorted(x for r in mine for x in r.latencies_ms)
            p90 = pooled[int(len(pooled) * 0.9)]
            lines.append(
                f"| {codes[label]} | {database} | **{cpu:.2f}** | "
                + " · ".join(f"{r.cpu_ms:.2f}" for r in mine)
                + f" | {statistics.median(pooled):.2f} | {p90:.2f} |"
            )
    lines += [
        "",
        "## Machine",
        "",
        f"- nproc: {os.cpu_count()} ({_cpu_model()}); Python {sys.version.split()[0]}",
        "- PostgreSQL on the same machine (its own CPU is not counted)",
        "",
        "## Command",
        "",
        "```sh",
        ".venv/bin/python bench/turn_bench.py "
        + " ".join(a if " " not in a else f"'{a}'" for a in sys.argv[1:] if not a.startswith("/")),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument("--baseline", metavar="REV", help="also measure this commit, alternating")
    parser.add_argument("--output", default=str(HERE / "turn_results.md"), help="'' to not write")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two cores (server on core 0, client on core 1)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="turn-bench-src-") as src_dir:
        try:
            codes, sources = codes_to_measure(args.baseline, src_dir)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        runs: list[Run] = []
        try:
            for n in range(args.runs):
                for database in args.databases:
                    for label in codes:
                        run = run_once(label, sources[label], database, args.turns)
                        runs.append(run)
                        print(
                            f"run {n + 1} {codes[label]} {database}: "
                            f"{run.cpu_ms:.2f} ms server CPU per turn, "
                            f"latency median {statistics.median(run.latencies_ms):.2f} ms",
                            file=sys.stderr,
                        )
        finally:
            _kill_all()
    text = report(runs, args, codes)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
