"""The shipped production files agree with each other and with chathub:
compose's nginx is given the config whose upstreams are compose's replicas,
its certificates where that config reads them, and every setting compose
passes is one chathub reads. ``nginx -t`` checks both nginx configs."""

from __future__ import annotations

import re
import shutil
import subprocess
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
