"""What one extraction run reads and writes, on SQLite and PostgreSQL: every
message since the last run (whatever instance ran it), none of a turn in a
mode without extraction, nothing of a deleted session or of another team's,
each item linked to its own message, and a bad item or a failed write never
losing the rest.

Runs are started by hand (``Extractor.run``): the servers here debounce
extraction for ten minutes, so none starts by itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import text

from chathub.llm.factory import create_provider
from chathub.server import extraction
from chathub.server.extraction import Extractor
from chathub.storage.db import transaction
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

# An answer that never validates: the markers are read instead.
MARKERS = "scripted://?text=Sure.&json=" + quote(json.dumps({"tasks": [{"title": "x"}]}))


def answering(extraction: dict[str, Any]) -> str:
    """A scripted model whose extraction answer is ``extraction``."""
    return "scripted://?text=Sure.&json=" + quote(json.dumps(extraction))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def quiet_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    data_dir: Path = tmp_path_factory.mktemp(f"extraction-{request.param}")
    async with server_on(
        request.param, data_dir, llm=MARKERS, extraction_debounce_s=600
    ) as running:
        yield running


@pytest.fixture
async def server(quiet_server: RunningServer) -> RunningServer:
    await wipe(quiet_server.state)
    return quiet_server


@pytest.fixture
async def team(server: RunningServer) -> TeamFixture:
    return await make_team(server.state, "Acme")


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(server) as c:
        yield c


@asynccontextmanager
async def instance(
    server: RunningServer, llm: str = MARKERS, debounce_s: float = 600
) -> AsyncIterator[Extractor]:
    """An extractor as another instance of the server would have: the same
    database and bus, nothing of this one's memory."""
    extractor = Extractor(
        sessionmaker=server.state.sessionmaker,
        provider=create_provider(llm),
        dashboards=server.state.dashboards,
        debounce_s=debounce_s,
    )
    try:
        yield extractor
    finally:
        await extractor.close()


async def new_session(client: httpx.AsyncClient, team: TeamFixture) -> str:
    r = await client.post("/chat/sessions", json={}, headers=team.owner.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def say(
    client: httpx.AsyncClient, team: TeamFixture, sid: str, content: str, mode: str | None = None
) -> dict[str, Any]:
    """One finished turn; returns it (``message``, ``reply``)."""
    body: dict[str, Any] = {"content": content}
    if mode is not None:
        body["mode"] = mode
    r = await client.post(f"/chat/sessions/{sid}/messages", json=body, headers=team.owner.headers)
    assert r.status_code in (200, 201), r.text
    turn: dict[str, Any] = r.json()
    return turn


async def listed(client: httpx.AsyncClient, team: TeamFixture, what: str) -> list[dict[str, Any]]:
    """Every item of ``/dashboard/{what}``, all pages."""
    items: list[dict[str, Any]] = []
    params = {"limit": "100"}
    while True:
        r = await client.get(f"/dashboard/{what}", params=params, headers=team.owner.headers)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        if not r.json().get("next_cursor"):
            return items
        params["cursor"] = r.json()["next_cursor"]


async def titles(client: httpx.AsyncClient, team: TeamFixture) -> list[tuple[str, str]]:
    return sorted((t["title"], t["status"]) for t in await listed(client, team, "tasks"))


async def test_a_bad_item_does_not_drop_the_others(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    answer = {
        "tasks": [{"title": "renew the domain name", "owner": None, "due": None, "status": "open"}],
        "insights": [{"text": "   \n", "kind": "insight"}],  # blank once stripped
        "states": [{"key": "launch.phase", "value": "beta"}],
    }
    sid = await new_session(client, team)
    await say(client, team, sid, "we must renew the domain; launch is in beta")
    async with instance(server, answering(answer)) as extractor:
        changes = await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [("renew the domain name", "open")]
    assert await listed(client, team, "insights") == []
    state = await client.get("/dashboard/states/launch.phase", headers=team.owner.headers)
    assert state.status_code == 200 and state.json()["value"] == "beta"
    assert set(changes) == {"tasks", "states"}


@asynccontextmanager
async def refusing_task_writes(server: RunningServer, title: str) -> AsyncIterator[None]:
    """The database refuses to store a task titled ``title`` (as a failing
    database would): the write transaction fails as a whole."""
    async with transaction(server.state.sessionmaker) as db:
        if db.bind.dialect.name == "postgresql":
            await db.execute(
                text(
                    "CREATE FUNCTION extraction_test_refuse() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.title = '{title}' THEN RAISE EXCEPTION 'refused'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            await db.execute(
                text(
                    "CREATE TRIGGER extraction_test_refuse BEFORE INSERT ON task_versions "
                    "FOR EACH ROW EXECUTE FUNCTION extraction_test_refuse()"
                )
            )
        else:
            await db.execute(
                text(
                    "CREATE TRIGGER extraction_test_refuse BEFORE INSERT ON task_versions "
                    f"WHEN NEW.title = '{title}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
    try:
        yield
    finally:
        async with transaction(server.state.sessionmaker) as db:
            if db.bind.dialect.name == "postgresql":
                await db.execute(text("DROP TRIGGER extraction_test_refuse ON task_versions"))
                await db.execute(text("DROP FUNCTION extraction_test_refuse()"))
            else:
                await db.execute(text("DROP TRIGGER extraction_test_refuse"))


async def test_a_batch_whose_write_fails_is_read_again(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: book the venue\nTODO: order the catering")
    async with instance(server) as extractor:
        async with refusing_task_writes(server, "order the catering"):
            assert await extractor.run(team.team_id, sid) == {}
        assert await titles(client, team) == []  # all or nothing
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [
        ("book the venue", "open"),
        ("order the catering", "open"),
    ]


async def test_a_state_key_storage_refuses_neither_fails_nor_blocks_the_session(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: order new laptops\nState: café.hours = 9-17")
    async with instance(server) as extractor:
        await extractor.run(team.team_id, sid)
        assert await titles(client, team) == [("order new laptops", "open")]
        await say(client, team, sid, "TODO: set up the new laptops")
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [
        ("order new laptops", "open"),
        ("set up the new laptops", "open"),
    ]
    assert await listed(client, team, "states") == []


async def test_a_burst_longer_than_a_batch_is_read_whole(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: first task in the burst")
    for n in range(6):
        await say(client, team, sid, f"chatter {n}")
    await say(client, team, sid, "TODO: last task in the burst")  # 16 messages in all
    async with instance(server) as extractor:
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [
        ("first task in the burst", "open"),
        ("last task in the burst", "open"),
    ]


async def test_a_session_far_behind_catches_up_over_several_runs(
    server: RunningServer,
    team: TeamFixture,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extraction, "WINDOW", 2)
    monkeypatch.setattr(extraction, "MAX_BATCHES", 1)
    sid = await new_session(client, team)
    for n in range(4):
        await say(client, team, sid, f"TODO: task number {n}")
    async with instance(server, debounce_s=0.01) as extractor:
        first = await extractor.run(team.team_id, sid)
        assert [t["title"] for t in first["tasks"]] == ["task number 0"]  # one batch, one turn
        for _ in range(200):  # the rest in runs it schedules itself
            if extractor.idle:
                break
            await asyncio.sleep(0.05)
        assert extractor.idle
    assert [title for title, _ in await titles(client, team)] == [
        f"task number {n}" for n in range(4)
    ]


async def test_turns_in_a_mode_without_extraction_are_never_extracted(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    # ``summarise`` is shipped with extraction off
    await say(client, team, sid, "TODO: secret reorg plan for the board", mode="summarise")
    await say(client, team, sid, "TODO: review the public roadmap", mode="chat")
    async with instance(server) as extractor:
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [("review the public roadmap", "open")]


async def test_items_link_to_the_message_they_come_from(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    todo = await say(client, team, sid, "TODO: write the quarterly report")
    decision = await say(client, team, sid, "Decision: we ship on Postgres")
    done = await say(client, team, sid, "Done: write the quarterly report")
    async with instance(server) as extractor:
        await extractor.run(team.team_id, sid)
    [task] = await listed(client, team, "tasks")
    [insight] = await listed(client, team, "insights")
    # created by the TODO (and closed by the Done, in the same run)
    assert task["status"] == "done"
    assert task["source_message_id"] == todo["message"]["id"]
    assert insight["source_message_id"] == decision["message"]["id"]
    assert done["message"]["id"] != task["source_message_id"]


async def test_the_model_names_the_message_of_each_item(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    answer = {
        "tasks": [
            {"title": "Ship the beta", "owner": "ana", "due": None, "status": "open", "message": 3}
        ],
        "insights": [{"text": "Beta users want dark mode", "kind": "insight"}],
        "states": [{"key": "beta.status", "value": "on track", "message": 4}],
    }
    sid = await new_session(client, team)
    first = await say(client, team, sid, "hello")  # messages 1 and 2
    ship = await say(client, team, sid, "Ana ships the beta")  # 3 and 4
    async with instance(server, answering(answer)) as extractor:
        await extractor.run(team.team_id, sid)
    [task] = await listed(client, team, "tasks")
    [insight] = await listed(client, team, "insights")
    [state] = await listed(client, team, "states")
    assert task["source_message_id"] == ship["message"]["id"]
    assert state["source_message_id"] == ship["reply"]["id"]
    # no number given: the batch's first user message
    assert insight["source_message_id"] == first["message"]["id"]


async def test_what_the_model_extracts_passes_the_output_guardrail(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    """The model's items are text shown to the whole team, as a reply is:
    redacted by the policy of the mode of the message each comes from."""
    answer = {
        "tasks": [
            {
                "title": "Send ana@example.com the beta plan",
                "owner": "ana@example.com",
                "due": None,
                "status": "open",
            }
        ],
        "insights": [{"text": "Card 4111 1111 1111 1111 was charged twice", "kind": "risk"}],
        "states": [
            {"key": "support.phone", "value": "+44 20 7946 0958"},
            {"key": "sk-live-4eC39HqLyjWDarjtT1zdp7dc", "value": "leaked"},
        ],
    }
    sid = await new_session(client, team)
    await say(client, team, sid, "Plan the beta")
    async with instance(server, answering(answer)) as extractor:
        await extractor.run(team.team_id, sid)
    [task] = await listed(client, team, "tasks")
    assert (task["title"], task["owner"]) == (
        "Send [redacted:email] the beta plan",
        "[redacted:email]",
    )
    [insight] = await listed(client, team, "insights")
    assert insight["text"] == "Card [redacted:card] was charged twice"
    # a key is a name: one that would be redacted is not written at all
    [state] = await listed(client, team, "states")
    assert (state["key"], state["value"]) == ("support.phone", "[redacted:phone]")


async def test_extracted_items_follow_the_policy_of_their_messages_mode(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    """A mode that allows e-mail addresses keeps them in what is extracted
    from its messages; one that blocks card numbers drops the item."""
    h = team.owner.headers
    mode = {
        "name": "crm",
        "system_prompt": "Help with customers.",
        "guardrails": {"rules": {"email": "allow", "card": "block"}},
    }
    assert (await client.post("/modes", json=mode, headers=h)).status_code == 201
    answer = {
        "tasks": [{"title": "Call ana@example.com", "owner": None, "due": None, "status": "open"}],
        "insights": [{"text": "Card 4111 1111 1111 1111 on file", "kind": "note"}],
        "states": [],
    }
    sid = await new_session(client, team)
    await say(client, team, sid, "Ana is a new customer", mode="crm")
    async with instance(server, answering(answer)) as extractor:
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [("Call ana@example.com", "open")]
    assert await listed(client, team, "insights") == []


async def test_the_team_summary_passes_the_default_policy(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    summary = "Ana (ana@example.com) ships the beta; call +44 20 7946 0958."
    async with instance(server, "scripted://?text=" + quote(summary)) as extractor:
        await extractor.refresh_summary(team.team_id)
    r = await client.get("/dashboard", headers=team.owner.headers)
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["text"] == (
        "Ana ([redacted:email]) ships the beta; call [redacted:phone]."
    )


async def test_a_deleted_session_is_not_extracted(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: task from a session deleted right away")
    r = await client.delete(f"/chat/sessions/{sid}", headers=team.owner.headers)
    assert r.status_code == 204
    async with instance(server) as extractor:
        assert await extractor.run(team.team_id, sid) == {}
    assert await titles(client, team) == []
    async with transaction(server.state.sessionmaker) as db:
        # a run that read it before the deletion writes nothing either
        assert not await summaries.mark_extracted(
            db, team_id=team.team_id, session_id=sid, after_id=None, until=sid
        )


async def test_a_session_is_read_for_its_own_team_only(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    other = await make_team(server.state, "Globex")
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: Acme's own business")
    async with instance(server) as extractor:
        assert await extractor.run(other.team_id, sid) == {}
        assert await titles(client, other) == []
        await extractor.run(team.team_id, sid)
    assert await titles(client, team) == [("Acme's own business", "open")]


async def test_another_instance_goes_on_where_the_last_run_stopped(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: prepare the offsite agenda")
    async with instance(server) as first:
        await first.run(team.team_id, sid)
    [task] = await listed(client, team, "tasks")
    r = await client.patch(
        f"/dashboard/tasks/{task['id']}",
        json={"title": "Offsite agenda (final)"},
        headers=team.owner.headers | {"If-Match": str(task["version"])},
    )
    assert r.status_code == 200, r.text
    await say(client, team, sid, "TODO: book the offsite rooms")
    async with instance(server) as second:  # a restart, or another instance
        await second.run(team.team_id, sid)
    assert await titles(client, team) == [
        ("Offsite agenda (final)", "open"),
        ("book the offsite rooms", "open"),
    ]


async def test_two_instances_extract_a_batch_once(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, team)
    await say(client, team, sid, "TODO: plan the launch party\nDecision: party on Friday")
    async with instance(server) as a, instance(server) as b:
        await asyncio.gather(a.run(team.team_id, sid), b.run(team.team_id, sid))
    assert await titles(client, team) == [("plan the launch party", "open")]
    assert len(await listed(client, team, "insights")) == 1


async def longest_stall(work: Awaitable[object]) -> float:
    """The longest the event loop went without running a 1 ms ticker while
    ``work`` ran, in seconds."""
    longest = 0.0
    done = False

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await work
    finally:
        done = True
        await ticker
    return longest


TWENTY_TASKS = [
    "renew the SSL certificate",
    "book the venue for the offsite",
    "write the release notes",
    "migrate billing to the new provider",
    "hire a second designer",
    "update the onboarding docs",
    "fix the flaky login test",
    "order new laptops for the interns",
    "plan the quarterly review",
    "audit the vendor contracts",
    "clean up unused cloud buckets",
    "translate the help center",
    "prepare the investor update",
    "rotate the database passwords",
    "schedule the security training",
    "archive last year's tickets",
    "draft the hiring plan",
    "negotiate the office lease",
    "set up error alerting",
    "survey customers about pricing",
]


async def test_deduplication_against_many_open_tasks_does_not_stall_the_loop(
    server: RunningServer, team: TeamFixture, client: httpx.AsyncClient
) -> None:
    async with transaction(server.state.sessionmaker) as db:
        for n in range(1000):
            await board.create_task(
                db,
                team_id=team.team_id,
                title=f"follow up with customer account {n} about the renewal",
                author_kind="user",
            )
    sid = await new_session(client, team)
    await say(client, team, sid, "\n".join(f"TODO: {title}" for title in TWENTY_TASKS))
    async with instance(server) as extractor:
        stall = await longest_stall(extractor.run(team.team_id, sid))
    # Generous: a loop busy comparing 20 x 1000 titles stalls for seconds;
    # the speed itself is for benchmarks, not for this bound.
    assert stall < 0.5, f"the event loop stalled for {stall:.2f} s"
    assert len(await listed(client, team, "tasks")) == 1020


async def test_a_turn_in_a_mode_without_extraction_stays_unread_when_the_mode_changes(
    tmp_path: Path,
) -> None:
    """The run after a turn in an extraction-off mode moves past it while
    the mode still says off: turning extraction on later does not reach it."""
    async with server_on("sqlite", tmp_path, llm=MARKERS, extraction_debounce_s=0.05) as srv:
        team = await make_team(srv.state, "Acme")
        h = team.owner.headers
        async with http_client(srv) as client:
            quiet = {"name": "quiet", "system_prompt": "Be brief.", "extraction": False}
            assert (await client.post("/modes", json=quiet, headers=h)).status_code == 201
            sid = await new_session(client, team)
            await say(client, team, sid, "TODO: secret reorg plan for the board", mode="quiet")
            await eventually(lambda: srv.state.extractor.idle)
            await asyncio.sleep(0.2)  # a debounced run would have started by now
            await eventually(lambda: srv.state.extractor.idle)
            quiet["extraction"] = True
            assert (await client.put("/modes/quiet", json=quiet, headers=h)).status_code == 200
            await say(client, team, sid, "TODO: review the public roadmap", mode="chat")
            await asyncio.sleep(0.2)
            await eventually(lambda: srv.state.extractor.idle)
            assert await titles(client, team) == [("review the public roadmap", "open")]
