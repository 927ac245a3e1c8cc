"""Extraction: the deterministic extractor, validation and fallback, dedupe."""

from __future__ import annotations

import datetime as dt

from chathub.llm.extraction import (
    ExtractedInsight,
    ExtractedTask,
    KnownTask,
    Source,
    deterministic,
    extract,
    new_insights,
    plan_task_changes,
    resolve_date,
)
from chathub.llm.factory import create_provider

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
    assert update.fields == {"status": "done"}
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
