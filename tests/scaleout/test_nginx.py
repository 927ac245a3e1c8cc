"""The fan-out test through nginx (deploy/nginx/nginx-local.conf, round robin,
no stickiness): sockets land on different replicas and all see one reply."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.scaleout.conftest import (
    FULL_TEXT,
    Cluster,
    Deployment,
    Instance,
    assert_contiguous,
    deltas,
    ends,
    events,
    free_port,
    reap,
    spawn,
    wait_until,
)
from tests.wsclient import WsClient, reply_end

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONF = REPO / "deploy" / "nginx" / "nginx-local.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
SOCKETS = 6


def local_conf(listen: int, upstreams: list[int]) -> str:
    """nginx-local.conf with our ports, as deploy/nginx/README.md says."""
    text = LOCAL_CONF.read_text()
    assert "127.0.0.1:8080" in text
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{listen}")
    for default, port in zip(("8001", "8002", "8003"), upstreams, strict=True):
        assert f"127.0.0.1:{default}" in text
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
    assert not re.search(r"127\.0\.0\.1:80\d\d\b", text), "a default port was left"
    return text


async def open_sockets(url: str) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        body = (await http.get(f"{url}/metrics")).text
    match = re.search(r"^chathub_open_sockets (\S+)$", body, re.M)
    return int(float(match.group(1))) if match else 0


@pytest.fixture
async def proxied(cluster: Cluster) -> AsyncIterator[tuple[str, list[Instance]]]:
    """Three replicas behind an unprivileged nginx on a free port."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    instances = await cluster.start(3)
    prefix = Path(tempfile.mkdtemp(prefix="chathub-nginx-"))
    os.chmod(prefix, 0o755)  # nginx's worker may run as nobody
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(local_conf(port, [i.port for i in instances]))
    log = prefix / "nginx.log"
    proc = spawn([NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"], env={}, log=log)
    url = f"http://127.0.0.1:{port}"
    try:

        async def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{log.read_text(errors='replace')}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(up, timeout=15, what="nginx")
        yield url, instances
    finally:
        await reap(proc)  # SIGTERM: the master stops its worker too
        print(log.read_text(errors="replace")[-4000:])
        shutil.rmtree(prefix, ignore_errors=True)


async def test_sockets_through_nginx_land_anywhere_and_see_the_same_reply(
    proxied: tuple[str, list[Instance]], deployment: Deployment
) -> None:
    url, instances = proxied
    async with httpx.AsyncClient(base_url=url, timeout=15) as http:
        r = await http.post("/chat/sessions", json={}, headers=deployment.headers())
        assert r.status_code == 201, r.text
        session_id = r.json()["id"]
    ws_url = url.replace("http://", "ws://") + "/ws"
    clients = [
        await WsClient.connect(ws_url, deployment.api_key, max_queue=None, close_timeout=2)
        for _ in range(SOCKETS)
    ]
    try:
        # Round robin spread the sockets: every replica holds some.
        spread = [await open_sockets(i.url) for i in instances]
        assert sum(spread) == SOCKETS and all(spread), spread
        for client in clients:
            ack = await client.request({"type": "join", "session_id": session_id})
            assert ack["type"] == "ack", ack
        ack = await clients[0].request(
            {
                "type": "message.send",
                "session_id": session_id,
                "client_msg_id": "m1",
                "content": "hi",
            }
        )
        reply_id = ack["reply_id"]
        await asyncio.gather(*(c.until(reply_end(reply_id), timeout=15) for c in clients))
    finally:
        for client in clients:
            await client.close()

    first = events(clients[0].seen, session_id)
    for client in clients[1:]:
        assert events(client.seen, session_id) == first
    assert_contiguous(first)
    assert deltas(first, reply_id) == FULL_TEXT
    (end,) = ends(first, reply_id)
    assert end["type"] == "reply.completed" and end["message"]["content"] == FULL_TEXT


async def test_a_same_origin_page_connects_through_nginx_on_its_own_port(
    proxied: tuple[str, list[Instance]], deployment: Deployment
) -> None:
    """With no allow-list, a page served from nginx's own origin (scheme,
    host and port) may open the socket: nginx hands the replicas the Host
    the browser sent, port included."""
    url, _ = proxied
    ws_url = url.replace("http://", "ws://") + "/ws"
    client = await WsClient.connect(ws_url, deployment.api_key, origin=url)
    try:
        assert client.welcome["type"] == "welcome"
    finally:
        await client.close()
    with pytest.raises(InvalidStatus) as refused:
        await WsClient.connect(ws_url, deployment.api_key, origin="http://127.0.0.1:1")
    assert refused.value.response.status_code == 403
