"""Extraction: tasks, insights and states from a conversation.

The model is asked first (a forced tool with Anthropic, a JSON schema with
OpenAI-compatible servers, a grammar with llama.cpp: each provider's
``structured``), its answer validated with pydantic; an invalid answer is
asked again once with the errors; after that, or when the provider cannot
answer with structure, the deterministic extractor below serves. Nothing here
touches storage: deduplication against what exists is :func:`plan_changes`,
a pure function, and writing is the caller's.
"""

from __future__ import annotations

import datetime as dt
import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    LLMProvider,
    ProviderError,
    StructuredOutput,
)
from chathub.llm.retry import PROVIDER_ERRORS

log = logging.getLogger("chathub.extraction")

SIMILAR = 0.85
"""Normalised texts at least this similar are the same task or insight."""


class ExtractedTask(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: Annotated[str, Field(min_length=3, max_length=500)]
    owner: Annotated[str, Field(max_length=200)] | None = None
    due: str | None = Field(default=None, description="YYYY-MM-DD")
    status: Literal["open", "done", "dropped"] = "open"

    @field_validator("due")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        dt.date.fromisoformat(value)
        return value

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return value.strip().lstrip("@") or None if value else None


class ExtractedInsight(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: Annotated[str, Field(min_length=3, max_length=2000)]
    kind: Literal["insight", "decision", "risk", "question", "note"] = "insight"


class ExtractedState(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")]
    value: str | int | float | bool


class Extraction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tasks: list[ExtractedTask] = Field(default_factory=list, max_length=50)
    insights: list[ExtractedInsight] = Field(default_factory=list, max_length=50)
    states: list[ExtractedState] = Field(default_factory=list, max_length=50)

    @property
    def empty(self) -> bool:
        return not (self.tasks or self.insights or self.states)


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "owner": {"type": ["string", "null"]},
                    "due": {"type": ["string", "null"], "description": "YYYY-MM-DD"},
                    "status": {"type": "string", "enum": ["open", "done", "dropped"]},
                },
                "required": ["title", "owner", "due", "status"],
            },
        },
        "insights": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "kind": {
                        "type": "string",
                        "enum": ["insight", "decision", "risk", "question", "note"],
                    },
                },
                "required": ["text", "kind"],
            },
        },
        "states": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                "required": ["key", "value"],
            },
        },
    },
    "required": ["tasks", "insights", "states"],
}

INSTRUCTIONS = """Extract from the conversation below, as data:
- tasks: concrete work someone will do (title; owner as a name or null; due as \
YYYY-MM-DD or null, resolving weekdays from today's date {today}; status open, \
done when the conversation says it is finished, dropped when abandoned);
- insights: decisions, risks, insights, open questions (text and kind);
- states: named facts with a current value, such as project status or a \
version number (key in lowercase with dots or underscores, value).
Only what the conversation says; empty lists when there is nothing."""


@dataclass(frozen=True)
class Source:
    """One message to extract from."""

    id: str
    role: str
    content: str


@dataclass(frozen=True)
class ExtractionResult:
    extraction: Extraction
    author_kind: Literal["model", "extractor"]
    source_message_id: str | None


def _request(messages: Sequence[Source], today: dt.date, errors: str | None) -> CompletionRequest:
    transcript = "\n".join(f"[{m.role}] {m.content}" for m in messages)
    content = transcript
    if errors:
        content += (
            "\n\nYour previous answer was invalid:\n" + errors + "\nAnswer again, fixing these."
        )
    return CompletionRequest(
        turns=[ChatTurn("user", content)],
        system=INSTRUCTIONS.format(today=today.isoformat()),
        temperature=0.0,
        max_tokens=800,
    )


async def extract(
    provider: LLMProvider, messages: Sequence[Source], *, today: dt.date
) -> ExtractionResult:
    """Ask the model (twice at most), then fall back to the markers."""
    source = messages[-1].id if messages else None
    if isinstance(provider, StructuredOutput):
        errors: str | None = None
        for _attempt in range(2):
            try:
                raw = await provider.structured(
                    _request(messages, today, errors), name="record_extraction", schema=SCHEMA
                )
                return ExtractionResult(Extraction.model_validate(raw), "model", source)
            except ValidationError as exc:
                errors = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10]
                )
                log.info("extraction answer invalid: %s", errors)
            except ProviderError as exc:
                PROVIDER_ERRORS.labels(code=exc.code).inc()
                log.info("extraction by the model failed (%s); using markers", exc.code)
                break
    return ExtractionResult(deterministic(messages, today=today), "extractor", source)


# --- the deterministic extractor -----------------------------------------

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_TASK_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?(?:TODO|To-?do|Action item|Action|Task)\s*:\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_DONE_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?(?:Done|Finished|Completed)\s*:\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_WILL = re.compile(r"@(?P<owner>[A-Za-z][\w.-]{0,40})\s+will\s+(?P<body>[^.\n!?]+)", re.IGNORECASE)
_INSIGHT_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?(?P<kind>Decision|Insight|Risk|Question|Note)\s*:\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_STATUS_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?(?:(?P<subject>[A-Za-z][\w .-]{0,60}?)\s+)?status\s*:\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_STATE_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?State\s*:\s*(?P<key>[A-Za-z0-9][\w.:-]{0,199})\s*=\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_OWNER = re.compile(r"(?:^|\s)@(?P<owner>[A-Za-z][\w.-]{0,40})")
_BY = re.compile(
    r"\s*\b(?:by|before|due|on)\s+(?P<when>(?:next\s+)?(?:"
    + "|".join(WEEKDAYS)
    + r")|today|tomorrow|\d{4}-\d{2}-\d{2})\b",
    re.IGNORECASE,
)


def resolve_date(when: str, today: dt.date) -> str | None:
    """``friday`` → the next Friday after today (today itself if it is one)."""
    when = when.lower().strip()
    if when == "today":
        return today.isoformat()
    if when == "tomorrow":
        return (today + dt.timedelta(days=1)).isoformat()
    extra = 0
    if when.startswith("next "):
        when, extra = when[5:], 7
    if when in WEEKDAYS:
        days = (WEEKDAYS.index(when) - today.weekday()) % 7 + extra
        return (today + dt.timedelta(days=days)).isoformat()
    try:
        return dt.date.fromisoformat(when).isoformat()
    except ValueError:
        return None


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s")


def _task(body: str, today: dt.date, owner: str | None, status: str) -> ExtractedTask | None:
    body = _SENTENCE_END.split(body, maxsplit=1)[0]  # a marker names one sentence
    due = None
    found = _BY.search(body)
    if found:
        due = resolve_date(found["when"], today)
        body = body[: found.start()] + body[found.end() :]
    named = _OWNER.search(body)
    if named and owner is None:
        owner = named["owner"]
        body = body[: named.start()] + " " + body[named.end() :]
    title = " ".join(body.split()).strip(" .;,")
    if len(title) < 3:
        return None
    return ExtractedTask(title=title[:500], owner=owner, due=due, status=status)


def deterministic(messages: Sequence[Source], *, today: dt.date) -> Extraction:
    """Tasks, insights and states from explicit markers ("TODO:", "Action
    item:", "@name will …", "by Friday", "Decision:", "Insight:", "Status:",
    "State: key = value", "Done: …")."""
    tasks: list[ExtractedTask] = []
    insights: list[ExtractedInsight] = []
    states: dict[str, ExtractedState] = {}
    for message in messages:
        text = message.content
        for m in _TASK_MARKER.finditer(text):
            if task := _task(m["body"], today, None, "open"):
                tasks.append(task)
        for m in _DONE_MARKER.finditer(text):
            if task := _task(m["body"], today, None, "done"):
                tasks.append(task)
        for m in _WILL.finditer(text):
            if task := _task(m["body"], today, m["owner"], "open"):
                tasks.append(task)
        for m in _INSIGHT_MARKER.finditer(text):
            body = m["body"].strip()
            if len(body) >= 3:
                insights.append(ExtractedInsight(text=body[:2000], kind=m["kind"].lower()))
        for m in _STATUS_MARKER.finditer(text):
            subject = (m["subject"] or "project").strip().lower()
            key = re.sub(r"[^a-z0-9]+", "_", subject).strip("_") + ".status"
            states[key] = ExtractedState(key=key, value=m["body"].strip()[:500])
        for m in _STATE_MARKER.finditer(text):
            states[m["key"]] = ExtractedState(key=m["key"], value=m["body"].strip()[:500])
    return Extraction(tasks=tasks[:50], insights=insights[:50], states=list(states.values())[:50])


# --- deduplication -------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def similar(a: str, b: str) -> bool:
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return True
    return difflib.SequenceMatcher(None, na, nb).ratio() >= SIMILAR


@dataclass(frozen=True)
class KnownTask:
    id: str
    version: int
    title: str
    owner: str | None
    due: str | None
    status: str


@dataclass(frozen=True)
class TaskChange:
    """Create (``task_id`` None) or a new version of a known task."""

    task_id: str | None
    expected_version: int | None
    fields: dict[str, Any]


def plan_task_changes(
    found: Sequence[ExtractedTask], known: Sequence[KnownTask]
) -> list[TaskChange]:
    """New tasks, and changes to known ones (done, new owner, new date); a task
    already known as it is gives nothing."""
    changes: list[TaskChange] = []
    seen: list[str] = []
    for task in found:
        if any(similar(task.title, s) for s in seen):
            continue
        seen.append(task.title)
        match = next((k for k in known if similar(k.title, task.title)), None)
        if match is None:
            changes.append(TaskChange(None, None, task.model_dump()))
            continue
        update: dict[str, Any] = {}
        # Re-mentioning a task does not reopen it; only done or dropped change it.
        if task.status != match.status and task.status != "open":
            update["status"] = task.status
        if task.owner and task.owner != match.owner:
            update["owner"] = task.owner
        if task.due and task.due != match.due:
            update["due"] = task.due
        if update:
            changes.append(TaskChange(match.id, match.version, update))
    return changes


def new_insights(
    found: Sequence[ExtractedInsight], known_texts: Sequence[str]
) -> list[ExtractedInsight]:
    out: list[ExtractedInsight] = []
    for insight in found:
        if any(similar(insight.text, k) for k in [*known_texts, *(o.text for o in out)]):
            continue
        out.append(insight)
    return out
