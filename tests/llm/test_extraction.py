"""Extraction: the deterministic extractor, validation and fallback, dedupe."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from urllib.parse import quote

import pytest
from pydantic import ValidationError

from chathub.llm import extraction
from chathub.llm.extraction import (
    ExtractedInsight,
    ExtractedTask,
    ExtractionResult,
    KnownTask,
    Source,
    deterministic,
    extract,
    new_insights,
    plan_task_changes,
    resolve_date,
    similar,
)
from chathub.llm.factory import create_provider
from chathub.storage.repositories.dashboard import STATE_KEY_PATTERN

THURSDAY = dt.date(2026, 11, 26)


def test_markers() -> None:
    text = (
        "Morning all.\n"
        "TODO: write the release notes by Friday\n"
        "- Action item: @maria review the API design\n"
        "@sam will fix the login bug by 2026-12-03.\n"
        "Decision: we ship the beta on Monday\n"
        "Insight: users drop off at the signup form\n"
        "Risk: the payment provider may be late\n"
        "Beta status: on track\n"
        "State: release.version = 1.4.2\n"
        "Done: set up the staging server\n"
    )
    got = deterministic([Source("m1", "user", text)], today=THURSDAY)
    tasks = {t.title: t for t in got.tasks}
    assert tasks["write the release notes"].due == "2026-11-27"
    assert tasks["review the API design"].owner == "maria"
    assert tasks["fix the login bug"].owner == "sam"
    assert tasks["fix the login bug"].due == "2026-12-03"
    assert tasks["set up the staging server"].status == "done"
    kinds = {i.kind: i.text for i in got.insights}
    assert kinds == {
        "decision": "we ship the beta on Monday",
        "insight": "users drop off at the signup form",
        "risk": "the payment provider may be late",
    }
    states = {s.key: s.value for s in got.states}
    assert states == {"beta.status": "on track", "release.version": "1.4.2"}


def test_plain_chat_extracts_nothing() -> None:
    got = deterministic([Source("m1", "user", "How are you? The weather is nice.")], today=THURSDAY)
    assert got.empty


def test_dates() -> None:
    assert resolve_date("thursday", THURSDAY) == "2026-11-26"
    assert resolve_date("next monday", THURSDAY) == "2026-12-07"
    assert resolve_date("tomorrow", THURSDAY) == "2026-11-27"
    assert resolve_date("someday", THURSDAY) is None


def test_dedupe_and_changes_to_known_tasks() -> None:
    known = [KnownTask("t1", 2, "Write the release notes", None, None, "open")]
    found = [
        ExtractedTask(title="write the release-notes", status="done"),
        ExtractedTask(title="Write the release notes!", owner="ana"),
        ExtractedTask(title="Book the venue", due="2026-12-01"),
        ExtractedTask(title="book the venue"),
    ]
    changes = plan_task_changes(found, known)
    assert len(changes) == 2
    update, create = changes
    assert update.task_id == "t1" and update.expected_version == 2
    # both mentions apply, in order (one after the other would give the same)
    assert update.fields == {"status": "done", "owner": "ana"}
    assert create.task_id is None and create.fields["title"] == "Book the venue"
    # the same facts again give no change
    known_now = [KnownTask("t1", 3, "Write the release notes", None, None, "done")]
    assert plan_task_changes([ExtractedTask(title="write the release notes")], known_now) == []
    assert new_insights(
        [ExtractedInsight(text="Users drop off at signup."), ExtractedInsight(text="New one here")],
        ["users drop off at signup"],
    ) == [ExtractedInsight(text="New one here")]


async def test_invalid_model_output_falls_back_to_markers() -> None:
    # The scripted model answers with JSON that fails validation both times.
    provider = create_provider('scripted://?json={"tasks":[{"title":"x","due":"soon"}]}')
    got = await extract(
        provider, [Source("m9", "user", "TODO: pay the invoice by friday")], today=THURSDAY
    )
    assert got.author_kind == "extractor" and got.source_message_id == "m9"
    assert [t.title for t in got.extraction.tasks] == ["pay the invoice"]


async def test_valid_model_output_is_used() -> None:
    provider = create_provider(
        'scripted://?json={"tasks":[{"title":"Pay the invoice","owner":"ana","due":"2026-11-27",'
        '"status":"open"}],"insights":[],"states":[{"key":"budget.left","value":"1200"}]}'
    )
    got = await extract(provider, [Source("m1", "user", "anything")], today=THURSDAY)
    assert got.author_kind == "model"
    assert got.extraction.tasks[0].owner == "ana"
    assert got.extraction.states[0].value == "1200"


# --- what storage would refuse is refused here, item by item ----------------


def test_items_are_checked_as_storage_checks_them() -> None:
    for bad in ("   \n", "  ab  "):
        with pytest.raises(ValidationError):
            ExtractedInsight(text=bad)
        with pytest.raises(ValidationError):
            ExtractedTask(title=bad)
    assert ExtractedTask(title="  Pay the invoice \n").title == "Pay the invoice"
    assert ExtractedTask(title="Pay it", due="20300101").due == "2030-01-01"
    assert ExtractedTask(title="Pay it", owner=" @ana ").owner == "ana"
    assert f"^{extraction.STATE_KEY}$" == STATE_KEY_PATTERN


async def test_a_second_invalid_answer_keeps_its_valid_items() -> None:
    answer = {
        "tasks": [{"title": "renew the domain name", "status": "open"}, {"title": " "}],
        "insights": [{"text": "   \n", "kind": "insight"}],
        "states": [{"key": "launch.phase", "value": "beta"}, {"key": "café.hours", "value": "9"}],
    }
    provider = create_provider("scripted://?json=" + quote(json.dumps(answer)))
    got = await extract(provider, [Source("m1", "user", "anything")], today=THURSDAY)
    assert got.author_kind == "model"
    assert [t.title for t in got.extraction.tasks] == ["renew the domain name"]
    assert got.extraction.insights == []
    assert [(s.key, s.value) for s in got.extraction.states] == [("launch.phase", "beta")]


def test_markers_storage_would_refuse_are_skipped_not_raised() -> None:
    text = (
        "TODO: order new laptops\n"
        "State: café.hours = 9-17\n"
        "Café status: open\n"
        "State: office.hours = 9-17\n"
    )
    got = deterministic([Source("m1", "user", text)], today=THURSDAY)
    assert [t.title for t in got.tasks] == ["order new laptops"]
    assert [(s.key, s.value) for s in got.states] == [("office.hours", "9-17")]


# --- deduplication --------------------------------------------------------

DISTINCT = [
    ("Review PR 123", "Review PR 124"),
    ("Call Alice about the Q3 budget", "Call Alice about the Q4 budget"),
    ("Deploy service A", "Deploy service B"),
    ("Deploy service A", "Deploy service"),
    ("Fix the EU checkout", "Fix the US checkout"),
    ("Book 2 rooms", "Book 3 rooms"),
    ("Upgrade the API to v2", "Upgrade the API to v3"),
    ("Call Jason", "Call Mason"),
    ("Email Dana", "Email Dan"),
    ("Write the release notes", "Write the release plan"),
]
SAME = [
    ("Write the release notes", "write the release-notes!"),
    ("Write the release notes", "Write release notes"),
    ("Book the venue", "book a venue"),
    ("Renew the SSL certificates", "renew the SSL certificate"),
    ("Set up the staging server", "setup the staging server"),
    ("renew the SSL certficate", "renew the SSL certificate"),
    ("Review PR 123", "review pr #123"),
]


@pytest.mark.parametrize(("a", "b"), DISTINCT)
def test_titles_that_differ_in_a_number_or_a_short_token_never_merge(a: str, b: str) -> None:
    assert not similar(a, b) and not similar(b, a)
    found = [ExtractedTask(title=a, due="2030-01-10", owner="ann"), ExtractedTask(title=b)]
    changes = plan_task_changes(found, [])
    assert [c.fields["title"] for c in changes] == [a, b]
    assert changes[1].fields["due"] is None and changes[1].fields["owner"] is None
    known = [KnownTask("t1", 1, a, "ann", "2030-01-10", "open")]
    assert plan_task_changes([ExtractedTask(title=b, owner="bob")], known)[0].task_id is None


@pytest.mark.parametrize(("a", "b"), SAME)
def test_the_same_title_written_differently_still_merges(a: str, b: str) -> None:
    assert similar(a, b) and similar(b, a)
    known = [KnownTask("t1", 1, a, None, None, "open")]
    [change] = plan_task_changes([ExtractedTask(title=b, status="done")], known)
    assert (change.task_id, change.fields) == ("t1", {"status": "done"})


def test_an_open_known_task_is_preferred_to_a_closed_one() -> None:
    known = [
        KnownTask("old", 3, "renew the passport", None, None, "done"),
        KnownTask("new", 1, "Renew the passport", None, None, "open"),
    ]
    [change] = plan_task_changes([ExtractedTask(title="renew the passport", owner="ann")], known)
    assert change.task_id == "new"


# --- mentions in message order ----------------------------------------------


def test_a_todo_then_done_in_one_run_ends_done() -> None:
    messages = [
        Source("m1", "user", "TODO: renew the passport @ann"),
        Source("m2", "assistant", "Noted."),
        Source("m3", "user", "Done: renew the passport"),
    ]
    [change] = plan_task_changes(deterministic(messages, today=THURSDAY).tasks, [])
    assert change.fields == {
        "title": "renew the passport",
        "owner": "ann",
        "due": None,
        "status": "done",
    }
    assert change.message == 1  # created by the TODO
    # within one message too, in the order written
    one = [
        Source("m1", "user", "Done: file the taxes\nTODO: book the flights\nTODO: file the taxes")
    ]
    tasks = deterministic(one, today=THURSDAY).tasks
    assert [(t.title, t.status) for t in tasks] == [
        ("file the taxes", "done"),
        ("book the flights", "open"),
        ("file the taxes", "open"),
    ]


def _one_by_one(mentions: list[ExtractedTask], known: KnownTask | None) -> KnownTask | None:
    """The task after each mention was extracted in a run of its own."""
    for n, mention in enumerate(mentions):
        for change in plan_task_changes([mention], [known] if known else []):
            if change.task_id is None:
                known = KnownTask(f"t{n}", 1, **change.fields)
            else:
                assert known is not None
                fields = {
                    "title": known.title,
                    "owner": known.owner,
                    "due": known.due,
                    "status": known.status,
                } | change.fields
                known = KnownTask(known.id, known.version + 1, **fields)
    return known


@pytest.mark.parametrize(
    "statuses_owners_dues",
    [
        [("open", None, None), ("done", None, None)],
        [("done", None, None), ("open", "bob", None)],
        [("open", "ann", "2030-01-01"), ("open", "bob", None), ("open", None, "2030-02-02")],
        [("open", None, None), ("dropped", None, None), ("done", "cy", None)],
    ],
)
@pytest.mark.parametrize("known_status", [None, "open", "done"])
def test_one_run_gives_what_a_run_per_mention_gives(
    statuses_owners_dues: list[tuple[str, str | None, str | None]], known_status: str | None
) -> None:
    mentions = [
        ExtractedTask(title="renew the passport", status=status, owner=owner, due=due)
        for status, owner, due in statuses_owners_dues
    ]
    known = (
        KnownTask("k", 1, "renew the passport", None, None, known_status) if known_status else None
    )
    expected = _one_by_one(mentions, known)
    changes = plan_task_changes(mentions, [known] if known else [])
    assert len(changes) <= 1
    got = known
    if changes and changes[0].task_id is None:
        got = KnownTask("t", 1, **changes[0].fields)
    elif changes:
        assert known is not None
        got = replace(known, **changes[0].fields)
    assert expected is not None and got is not None
    assert (got.owner, got.due, got.status) == (expected.owner, expected.due, expected.status)


# --- sources ----------------------------------------------------------------


def test_each_marker_names_its_own_message() -> None:
    messages = [
        Source("u1", "user", "TODO: write the quarterly report"),
        Source("a1", "assistant", "Noted."),
        Source("u2", "user", "Decision: we ship on Postgres\nState: db.engine = postgres"),
    ]
    got = deterministic(messages, today=THURSDAY)
    result = ExtractionResult(got, "extractor", "u1", tuple(m.id for m in messages))
    assert [result.source_of(t.message) for t in got.tasks] == ["u1"]
    assert [result.source_of(i.message) for i in got.insights] == ["u2"]
    assert [result.source_of(s.message) for s in got.states] == ["u2"]


async def test_the_model_names_each_item_s_message_else_the_first_user_message() -> None:
    answer = {
        "tasks": [
            {"title": "Pay the invoice", "status": "open", "message": 3},
            {"title": "Call the bank", "status": "open", "message": "#2"},
            {"title": "Close the books", "status": "open", "message": 99},
        ],
        "insights": [{"text": "Cash is tight", "kind": "risk", "message": "the last one"}],
        "states": [],
    }
    provider = create_provider("scripted://?json=" + quote(json.dumps(answer)))
    messages = [
        Source("a0", "assistant", "Welcome back."),
        Source("u1", "user", "We owe the supplier."),
        Source("u2", "user", "Pay them today."),
    ]
    got = await extract(provider, messages, today=THURSDAY)
    assert got.author_kind == "model"
    sources = [got.source_of(t.message) for t in got.extraction.tasks]
    assert sources == ["u2", "u1", "u1"]
    assert got.source_of(got.extraction.insights[0].message) == "u1"
