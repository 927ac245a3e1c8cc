"""Liveness, readiness and metrics."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from chathub.storage.migrate import upgrade_async
from tests.harness import (
    TeamFixture,
    create_pg_database,
    drop_pg_database,
    http_client,
    pg_url,
    server_on,
    start_server,
    test_settings,
)


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok",
        "schema": "ok",
        "bus": "ok",
        "session_log": "ok",
        "llm": "ok",
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_readyz_is_not_ready_on_an_older_schema(tmp_path: Path, backend: str) -> None:
    """A replica started on a database not (yet) migrated to this code's
    revision is not ready (``schema``), and becomes ready once it is."""
    pg_name = await create_pg_database() if backend == "postgres" else None
    url = pg_url(pg_name) if pg_name else f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    try:
        await upgrade_async(url, "0002")
        server = await start_server(test_settings(url, tmp_path), migrate=False)
        try:
            async with http_client(server) as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 503, ready.text
                assert ready.json()["checks"]["schema"] == "error"
                assert ready.json()["checks"]["database"] == "ok"
                assert "schema" in ready.json()["detail"]
                await upgrade_async(url)
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["checks"]["schema"] == "ok"
        finally:
            await server.stop()
    finally:
        if pg_name:
            await drop_pg_database(pg_name)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_readyz_checks_the_named_providers_too(tmp_path: Path) -> None:
    """A mode's provider (CHATHUB_LLM_PROVIDERS) that cannot be reached makes
    the instance not ready, and the checks name it."""
    down = f"openai://gpt-test?base_url=http://127.0.0.1:{closed_port()}/v1"
    async with (
        server_on("sqlite", tmp_path, llm_providers={"fast": "scripted://", "down": down}) as srv,
        http_client(srv) as client,
    ):
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["llm"] == "ok"
    assert checks["llm:fast"] == "ok"
    assert checks["llm:down"] == "error"


async def test_metrics_count_requests_by_route(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    await client.get("/chat/sessions", headers=team.owner.headers)
    body = (await client.get("/metrics")).text
    assert (
        'chathub_http_request_seconds_count{method="GET",route="/chat/sessions",status="200"}'
        in body
    )
    assert "chathub_open_sockets" in body and "chathub_replies_total" in body


async def test_openapi_describes_routes_errors_and_pages(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in (
        "/auth/token",
        "/chat/sessions",
        "/chat/sessions/{session_id}",
        "/chat/sessions/{session_id}/messages",
        "/dashboard",
        "/dashboard/tasks",
        "/dashboard/tasks/{task_id}",
        "/dashboard/insights",
        "/dashboard/states",
        "/dashboard/states/{key}/history",
        "/team/members",
        "/team/api-keys",
        "/files",
        "/files/{file_id}",
        "/files/{file_id}/content",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    listing = paths["/chat/sessions"]["get"]
    params = {p["name"] for p in listing["parameters"]}
    assert {"limit", "cursor", "mode", "archived", "q"} <= params
    assert {"400", "401"} <= set(listing["responses"])
    assert "next_cursor" in str(listing["responses"]["200"]) or "Page" in str(
        listing["responses"]["200"]
    )
    patch = paths["/dashboard/tasks/{task_id}"]["patch"]
    assert "409" in patch["responses"]


async def test_openapi_says_what_errors_look_like_and_how_to_authenticate(
    client: httpx.AsyncClient,
) -> None:
    """Error responses carry the Problem schema under problem+json (the type
    sent), no route promises a 422 (bad input is 400), and the routes that
    need credentials say so, as a bearer token."""
    spec = (await client.get("/openapi.json")).json()
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (path, method)
            for status, response in responses.items():
                if int(status) >= 400:
                    assert response["content"] == {
                        "application/problem+json": {"schema": problem}
                    }, (
                        path,
                        method,
                        status,
                    )
            public = path in {"/auth/token", "/healthz", "/readyz", "/metrics"}
            assert operation.get("security") == ([] if public else None), (path, method)
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    send = spec["paths"]["/chat/sessions/{session_id}/messages"]["post"]["responses"]
    assert {"201", "413", "429"} <= set(send)


async def test_the_api_documentation_can_be_turned_off(tmp_path: Path) -> None:
    """Served by default, without credentials; CHATHUB_API_DOCS=false leaves
    the documentation and the schema out, and nothing else."""
    async with server_on("sqlite", tmp_path / "on") as srv, http_client(srv) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
    async with (
        server_on("sqlite", tmp_path / "off", api_docs=False) as srv,
        http_client(srv) as client,
    ):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/healthz")).status_code == 200
