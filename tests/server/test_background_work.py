"""Background work on the embedded model gives way to users' replies, and
loses nothing by it: extraction, the dashboard summary and the session
summary, each stopped by a reply, store nothing and run again later.

The owners (``chathub.server.extraction``, ``chathub.server.summarizer``) run
here on a real database with the real SmolLM2; the server's own extractor is
debounced for ten minutes, so only the ones built here run."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from chathub.llm.base import ChatTurn, CompletionRequest, StreamEnd, TextDelta
from chathub.llm.context import estimate_counter
from chathub.llm.factory import create_provider
from chathub.llm.local import LocalProvider
from chathub.server.extraction import Extractor
from chathub.server.summarizer import SessionSummarizer
from chathub.storage.repositories import dashboard as board
from chathub.storage.repositories import summaries
from tests.harness import (
    RunningServer,
    TeamFixture,
    eventually,
    http_client,
    make_team,
    server_on,
    wipe,
)

pytestmark = pytest.mark.local_model

# A scripted extraction answer that never validates: the markers are read.
MARKERS = "scripted://?text=Sure.&json=" + quote(json.dumps({"tasks": [{"title": "x"}]}))


@pytest.fixture(scope="module")
async def quiet_server(
    local_model_available: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    data_dir: Path = tmp_path_factory.mktemp("background-work")
    async with server_on("sqlite", data_dir, extraction_debounce_s=600) as running:
        yield running


@pytest.fixture
async def server(quiet_server: RunningServer) -> RunningServer:
    await wipe(quiet_server.state)
    return quiet_server


@pytest.fixture(scope="module")
async def local(local_model_available: None) -> AsyncIterator[LocalProvider]:
    provider = create_provider("local://", n_ctx=2048)
    assert isinstance(provider, LocalProvider)
    yield provider
    await provider.aclose()


async def session_with(server: RunningServer, team: TeamFixture, *contents: str) -> str:
    """A new session with one finished turn (scripted reply) per content."""
    async with http_client(server) as client:
        r = await client.post("/chat/sessions", json={}, headers=team.owner.headers)
        assert r.status_code == 201, r.text
        sid = str(r.json()["id"])
        for content in contents:
            r = await client.post(
                f"/chat/sessions/{sid}/messages",
                json={"content": content},
                headers=team.owner.headers,
            )
            assert r.status_code == 201, r.text
    return sid


async def a_reply(local: LocalProvider) -> list[str]:
    """An interactive generation, whole; what it streamed, in order."""
    request = CompletionRequest(turns=[ChatTurn("user", "Say yes.")], max_tokens=4)
    seen: list[str] = []
    async for event in local.stream(request):
        if isinstance(event, TextDelta) and not seen:
            seen.append("first token")
        elif isinstance(event, StreamEnd):
            seen.append("ended")
    return seen


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    """Wait until ``await check()`` holds (a model run may take many seconds)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def read_until(server: RunningServer, team: TeamFixture, sid: str) -> str | None:
    """Where extraction of the session stands (``chat_sessions.extracted_until``)."""
    async with server.state.sessionmaker() as db:
        after, _rows = await summaries.extraction_batch(
            db, team_id=team.team_id, session_id=sid, limit=1
        )
    return after


async def task_titles(server: RunningServer, team: TeamFixture) -> list[str]:
    async with http_client(server) as client:
        r = await client.get("/dashboard/tasks", headers=team.owner.headers)
    assert r.status_code == 200, r.text
    return [t["title"] for t in r.json()["items"]]


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_extraction_stopped_for_a_reply_keeps_its_place_and_runs_again(
    server: RunningServer, local: LocalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chathub.extraction")
    team = await make_team(server.state, "Acme")
    sid = await session_with(server, team, "TODO: send the invoice to ACME by friday.")
    extractor = Extractor(
        sessionmaker=server.state.sessionmaker,
        provider=local,
        dashboards=server.state.dashboards,
        debounce_s=0.05,
    )
    try:
        run = asyncio.create_task(extractor.run(team.team_id, sid))
        await eventually(lambda: local.background_running or run.done(), timeout_s=30)
        assert await a_reply(local) == ["first token", "ended"]
        assert await run == {}
        # Stopped: nothing written, the messages still unread (no markers
        # standing in for the model), and no error logged.
        assert await read_until(server, team, sid) is None
        assert await task_titles(server, team) == []
        assert no_errors_logged(caplog)

        # It runs again by itself, once the model is free (the whole run takes
        # tens of seconds here: seeing it on the model again is enough).
        assert not extractor.idle
        await eventually(lambda: local.background_running, timeout_s=30)
    finally:
        await extractor.close()


async def test_a_dashboard_summary_stopped_for_a_reply_is_written_later(
    server: RunningServer, local: LocalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chathub.extraction")
    team = await make_team(server.state, "Acme")
    sid = await session_with(server, team, "TODO: send the invoice to ACME by friday.")
    extractor = Extractor(
        sessionmaker=server.state.sessionmaker,
        provider=local,  # the summary's
        dashboards=server.state.dashboards,
        debounce_s=0.05,
    )
    try:
        # The extraction by a scripted model (the markers) changes the board,
        # so the summary is written next, by the local model.
        extractor.schedule(team.team_id, sid, create_provider(MARKERS))
        await eventually(lambda: local.background_running, timeout_s=30)
        assert await task_titles(server, team) == ["send the invoice to ACME"]
        assert await a_reply(local) == ["first token", "ended"]

        async def summarised() -> bool:
            async with server.state.sessionmaker() as db:
                return await board.latest_summary(db, team_id=team.team_id) is not None

        await until(summarised)
        assert no_errors_logged(caplog)
        assert "gave way to a reply" in caplog.text
    finally:
        await extractor.close()


async def test_a_session_summary_stopped_for_a_reply_stores_nothing(
    server: RunningServer, local: LocalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chathub.summaries")
    team = await make_team(server.state, "Acme")
    # Four turns: eight messages, two more than a refresh leaves out.
    sid = await session_with(server, team, "We meet on Monday.", "Bob owns the budget.", "Ok", "Go")
    summarizer = SessionSummarizer(
        sessionmaker=server.state.sessionmaker,
        provider=local,
        count=estimate_counter,
        window=None,
    )
    refresh = asyncio.create_task(summarizer.refresh(team.team_id, sid))
    await eventually(lambda: local.background_running or refresh.done(), timeout_s=30)
    assert await a_reply(local) == ["first token", "ended"]
    await refresh
    async with server.state.sessionmaker() as db:
        assert await summaries.latest(db, session_id=sid) is None
    assert no_errors_logged(caplog)
    # Nothing lost: the refresh a later reply schedules writes it.
    await summarizer.refresh(team.team_id, sid)
    async with server.state.sessionmaker() as db:
        summary = await summaries.latest(db, session_id=sid)
    assert summary is not None and summary.text
