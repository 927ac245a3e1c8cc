"""``chathub serve --workers N``: worker processes on one listening socket,
each an instance of its own, sharing PostgreSQL and Redis; refused where
they would share nothing (the embedded defaults)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.scaleout.conftest import (
    PY,
    Deployment,
    assert_contiguous,
    connect,
    events,
    join,
    new_session,
    reap,
    send,
    spawn_serve,
    wait_until,
)
from tests.wsclient import reply_end

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(120)]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                # pid (comm) state ppid ...: comm may hold spaces, so after ")"
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


async def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of one ``/metrics`` answer."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


async def scrape_value(url: str, name: str, expected: float) -> bool:
    """Whether two scrapes in a row (likely from two workers) read ``expected``."""
    return all([(await scrape(url)).get(name) == expected for _ in range(2)])


def is_worker(pid: int) -> bool:
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"spawn_main" in cmdline and b"resource_tracker" not in cmdline
    return False


async def test_workers_serve_one_port_and_share_sessions(
    deployment: Deployment, tmp_path: Path
) -> None:
    env = deployment.env(tmp_path / "data")
    server = spawn_serve("W", env, tmp_path / "serve.log", tmp_path, "--workers", "3")
    workers: list[int] = []
    try:
        await server.wait_ready()
        for _ in range(100):
            workers = [pid for pid in children(server.proc.pid) if is_worker(pid)]
            if len(workers) == 3:
                break
            await asyncio.sleep(0.1)
        assert len(workers) == 3, (children(server.proc.pid), server.log_tail())

        # Sockets land on whichever worker accepts them; all see one reply.
        session_id = await new_session(server, deployment)
        sockets = [await connect(server, deployment) for _ in range(9)]
        try:
            for ws in sockets:
                await join(ws, session_id)
            reply_id = await send(sockets[0], session_id, "m1")
            await asyncio.gather(*(ws.until(reply_end(reply_id), timeout=20) for ws in sockets))
            # Any worker answers a scrape, with every worker's metrics.
            scrapes = [await scrape(server.url) for _ in range(8)]
            assert {s["chathub_open_sockets"] for s in scrapes} == {9.0}, scrapes
            frames_in = [s["chathub_frames_in_total"] for s in scrapes]
            assert frames_in == sorted(frames_in) and frames_in[0] >= 9 + 1, frames_in
        finally:
            for ws in sockets:
                await ws.close()
        seen = [events(ws.seen, session_id) for ws in sockets]
        assert all(s == seen[0] for s in seen)
        assert_contiguous(seen[0])
        assert seen[0][-1]["type"] == "reply.completed"

        # A worker killed with its sockets open: uvicorn starts another, and
        # the dead one's sockets no longer count.
        held = [await connect(server, deployment) for _ in range(6)]
        await wait_until(lambda: scrape_value(server.url, "chathub_open_sockets", 6.0), timeout=10)
        os.kill(workers[0], signal.SIGKILL)
        await wait_until(
            lambda: (
                len([p for p in children(server.proc.pid) if is_worker(p)]) == 3
                and workers[0] not in children(server.proc.pid)
            ),
            timeout=30,
            what="a new worker",
        )
        for ws in held:
            with contextlib.suppress(Exception):
                await ws.close()
        await wait_until(
            lambda: scrape_value(server.url, "chathub_open_sockets", 0.0),
            timeout=20,
            what="the dead worker's sockets to stop counting",
        )
        workers = [pid for pid in children(server.proc.pid) if is_worker(pid)]
    finally:
        # uvicorn's supervisor sees the signal between health checks of its
        # workers (up to 5 s each when the machine is busy), then stops them.
        await reap(server.proc, timeout=45)
        for pid in workers:  # SIGTERM on the parent stops them too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"worker {pid} outlived the server")
    assert server.proc.returncode == 0, server.log_tail()


async def test_workers_are_refused_on_the_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    env["CHATHUB_DATA_DIR"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "chathub", "serve", "--workers", "2",
        env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"--workers above 1 needs CHATHUB_DATABASE_URL" in err, err
