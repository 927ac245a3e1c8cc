"""Extraction: tasks, insights and states from a conversation.

The model is asked first (a forced tool with Anthropic, a JSON schema with
OpenAI-compatible servers, a grammar with llama.cpp: each provider's
``structured``), its answer validated with pydantic under the rules storage
applies; an invalid answer is asked again once with the errors; a second
invalid answer keeps its valid items. When nothing valid is left, or the
provider cannot answer with structure, the deterministic extractor below
serves. Nothing here touches storage: deduplication against what exists is
:func:`plan_task_changes` and :func:`new_insights`, pure functions, and
writing is the caller's.

Sources
    Every item names the message it comes from as ``message``, the number
    (from 1) of that message in the transcript given to the model, where each
    message is shown as ``[#n role]``. The deterministic extractor sets it
    itself. :meth:`ExtractionResult.source_of` turns it into a message id; an
    item whose number is missing or names no message of the transcript falls
    back to the transcript's first user message (its first message when it
    has none), the start of what the item can come from.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    LLMProvider,
    ProviderError,
    ProviderPreempted,
    StructuredOutput,
)
from chathub.llm.retry import PROVIDER_ERRORS

log = logging.getLogger("chathub.extraction")

STATE_KEY = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}"
"""A state key as storage accepts it (``dashboard.STATE_KEY_PATTERN``); the
markers read keys with the same pattern, so what they find validates."""


def _message_ref(value: Any) -> int | None:
    """A message number as the model may write it (``3``, ``"3"``, ``"#3"``);
    anything else is no reference, never an invalid item."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and (digits := value.strip().lstrip("#")).isdigit():
        return int(digits) or None
    return None


MessageRef = Annotated[int | None, BeforeValidator(_message_ref)]
# As storage checks text: stripped, then not empty (and at least 3 here).
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500)]
InsightText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=2000)
]


class ExtractedTask(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: Title
    owner: Annotated[str, Field(max_length=200)] | None = None
    due: str | None = Field(default=None, description="YYYY-MM-DD")
    status: Literal["open", "done", "dropped"] = "open"
    message: MessageRef = None

    @field_validator("due")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        # Storage takes YYYY-MM-DD only; fromisoformat also reads 20300101.
        return dt.date.fromisoformat(value).isoformat()

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return value.strip().lstrip("@").strip() or None if value else None

    def fields(self) -> dict[str, Any]:
        """What a task stores: title, owner, due and status."""
        return self.model_dump(exclude={"message"})


class ExtractedInsight(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: InsightText
    kind: Literal["insight", "decision", "risk", "question", "note"] = "insight"
    message: MessageRef = None


class ExtractedState(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Annotated[str, Field(pattern=f"^{STATE_KEY}$")]
    value: str | int | float | bool
    message: MessageRef = None


class Extraction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tasks: list[ExtractedTask] = Field(default_factory=list, max_length=50)
    insights: list[ExtractedInsight] = Field(default_factory=list, max_length=50)
    states: list[ExtractedState] = Field(default_factory=list, max_length=50)

    @property
    def empty(self) -> bool:
        return not (self.tasks or self.insights or self.states)


_MESSAGE = {
    "type": ["integer", "null"],
    "description": "the number n of the message [#n ...] it comes from",
}
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
                    "message": _MESSAGE,
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
                    "message": _MESSAGE,
                },
                "required": ["text", "kind"],
            },
        },
        "states": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "value": {"type": "string"},
                    "message": _MESSAGE,
                },
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
Each message starts with its number, as [#n role]: give every item the number \
of the message it comes from as message.
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
    """Where an item without a usable ``message`` comes from: the first user
    message of the transcript (its first message when it has none)."""
    message_ids: tuple[str, ...] = ()
    """The transcript's messages; an item's ``message`` n is the n-th."""

    def source_of(self, message: int | None) -> str | None:
        """The id of the message an item names, else :attr:`source_message_id`."""
        if message is not None and 1 <= message <= len(self.message_ids):
            return self.message_ids[message - 1]
        return self.source_message_id


def _request(messages: Sequence[Source], today: dt.date, errors: str | None) -> CompletionRequest:
    transcript = "\n".join(f"[#{n} {m.role}] {m.content}" for n, m in enumerate(messages, 1))
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
        background=True,  # nobody waits for it: users' replies go first
    )


_Item = TypeVar("_Item", bound=BaseModel)


def _valid(model: type[_Item], data: Any) -> _Item | None:
    """``data`` as ``model``, or None (logged) when it does not validate."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        log.info("extracted %s skipped: %s", model.__name__, exc.errors()[0]["msg"])
        return None


def _valid_items(model: type[_Item], items: Any) -> list[_Item]:
    if not isinstance(items, list):
        return []
    return [item for item in (_valid(model, data) for data in items) if item is not None][:50]


def salvage(raw: Any) -> Extraction:
    """The valid items of an answer that does not validate as a whole."""
    if not isinstance(raw, dict):
        return Extraction()
    return Extraction(
        tasks=_valid_items(ExtractedTask, raw.get("tasks")),
        insights=_valid_items(ExtractedInsight, raw.get("insights")),
        states=_valid_items(ExtractedState, raw.get("states")),
    )


async def extract(
    provider: LLMProvider, messages: Sequence[Source], *, today: dt.date
) -> ExtractionResult:
    """Ask the model (twice at most), keep the valid items of its last
    answer, then fall back to the markers when that leaves nothing. The
    model is asked as background work; stopped for a user's reply, it raises
    :class:`ProviderPreempted` rather than fall back: the messages are read
    again later, by the model."""
    ids = tuple(m.id for m in messages)
    first_user = next((m.id for m in messages if m.role == "user"), ids[0] if ids else None)
    if isinstance(provider, StructuredOutput):
        errors: str | None = None
        raw: Any = None
        for _attempt in range(2):
            try:
                raw = await provider.structured(
                    _request(messages, today, errors), name="record_extraction", schema=SCHEMA
                )
                return ExtractionResult(Extraction.model_validate(raw), "model", first_user, ids)
            except ValidationError as exc:
                errors = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10]
                )
                log.info("extraction answer invalid: %s", errors)
            except ProviderError as exc:
                PROVIDER_ERRORS.labels(code=exc.code).inc()
                if isinstance(exc, ProviderPreempted):
                    raise
                log.info("extraction by the model failed (%s)", exc.code)
                break
        kept = salvage(raw)
        if not kept.empty:
            return ExtractionResult(kept, "model", first_user, ids)
    return ExtractionResult(deterministic(messages, today=today), "extractor", first_user, ids)


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
# Keys only of what storage accepts: a subject or key with other letters
# (``Café status:``, ``State: café.hours = …``) is not a marker.
_STATUS_MARKER = re.compile(
    r"^\s*(?:[-*]\s*)?(?:(?P<subject>[A-Za-z][A-Za-z0-9_ .-]{0,60}?)\s+)?"
    r"status\s*:\s*(?P<body>.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_STATE_MARKER = re.compile(
    rf"^\s*(?:[-*]\s*)?State\s*:\s*(?P<key>{STATE_KEY})\s*=\s*(?P<body>.+)$",
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


def _task(
    body: str, today: dt.date, owner: str | None, status: str, message: int
) -> ExtractedTask | None:
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
    fields = {"title": title[:500], "owner": owner, "due": due, "status": status}
    return _valid(ExtractedTask, fields | {"message": message})


def deterministic(messages: Sequence[Source], *, today: dt.date) -> Extraction:
    """Tasks, insights and states from explicit markers ("TODO:", "Action
    item:", "@name will …", "by Friday", "Decision:", "Insight:", "Status:",
    "State: key = value", "Done: …"), in the order they were written, each
    with its message's number. A marker whose item does not validate is
    skipped; this never raises on what a message says."""
    tasks: list[ExtractedTask] = []
    insights: list[ExtractedInsight] = []
    states: dict[str, ExtractedState] = {}
    for n, message in enumerate(messages, 1):
        text = message.content
        mentions = sorted(
            (m for pattern in (_TASK_MARKER, _DONE_MARKER, _WILL) for m in pattern.finditer(text)),
            key=lambda m: m.start(),
        )
        for m in mentions:
            status = "done" if m.re is _DONE_MARKER else "open"
            owner = m["owner"] if m.re is _WILL else None
            if task := _task(m["body"], today, owner, status, n):
                tasks.append(task)
        for m in _INSIGHT_MARKER.finditer(text):
            body = m["body"].strip()
            data = {"text": body[:2000], "kind": m["kind"].lower(), "message": n}
            if len(body) >= 3 and (insight := _valid(ExtractedInsight, data)):
                insights.append(insight)
        found: list[tuple[int, str, str]] = []
        for m in _STATUS_MARKER.finditer(text):
            subject = (m["subject"] or "project").strip().lower()
            key = re.sub(r"[^a-z0-9]+", "_", subject).strip("_") + ".status"
            found.append((m.start(), key, m["body"]))
        found += [(m.start(), m["key"], m["body"]) for m in _STATE_MARKER.finditer(text)]
        for _, key, body in sorted(found):
            data = {"key": key, "value": body.strip()[:500], "message": n}
            if state := _valid(ExtractedState, data):
                states.pop(key, None)  # the last one wins, in its place
                states[key] = state
    return Extraction(tasks=tasks[:50], insights=insights[:50], states=list(states.values())[:50])


# --- deduplication -------------------------------------------------------
#
# Two titles name the same task when they are equal once case, punctuation,
# spacing, the articles "the"/"an"/"a" and a plural "s" are set aside, or
# when they differ in one lowercase word of five letters or more by a single
# typo (one letter added, dropped, changed or two swapped). Anything else
# keeps them apart, above all a different number ("PR 123"/"PR 124",
# "Q3"/"Q4") or a different short token ("service A"/"service B", "EU"/"US"):
# merging two distinct tasks loses one, where a missed duplicate is only
# visible clutter. Both tests are lookups in dicts built once per run, so
# comparing what a run found with every open task costs time linear in their
# number, not in their product.

_WORD = re.compile(r"[^\W_]+")
_ARTICLES = frozenset({"the", "an"})
_TYPO_MIN = 5


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass(frozen=True)
class _Words:
    words: tuple[str, ...]
    """Lowercase, without articles, a plural ``s`` dropped."""
    loose: tuple[bool, ...]
    """Which words a single typo may change: lowercase letters, five or more."""

    @classmethod
    def of(cls, text: str) -> _Words:
        words: list[str] = []
        loose: list[bool] = []
        for token in _WORD.findall(text):
            word = token.lower()
            # "A" as in "service A" is a name; "a" is the article.
            if word in _ARTICLES or token == "a":
                continue
            if word.isalpha() and len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
                word = word[:-1]
            words.append(word)
            loose.append(token.isalpha() and token.islower() and len(token) >= _TYPO_MIN)
        return cls(tuple(words), tuple(loose))

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """Equal for the same words, however spaced ("set up"/"setup"), and
        never for different numbers ("1 23"/"12 3")."""
        return "".join(self.words), tuple(w for w in self.words if w.isdigit())

    def near(self) -> Iterable[tuple[int, tuple[str, ...]]]:
        """One signature per word a typo may change: the others, in place."""
        for i, loose in enumerate(self.loose):
            if loose:
                yield i, (*self.words[:i], "", *self.words[i + 1 :])


def _one_edit(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by at most one insertion, deletion, substitution
    or swap of two neighbours."""
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1 :] == b[i + 1 :] or (
            a[i : i + 2] == b[i : i + 2][::-1] and a[i + 2 :] == b[i + 2 :]
        )
    if len(a) < len(b):
        return a[i:] == b[i + 1 :]
    return a[i + 1 :] == b[i:]


_T = TypeVar("_T")


class TitleIndex(Generic[_T]):
    """Values by title, found again by any title that names the same thing
    (see above); the first value added for a title wins."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, tuple[str, ...]], _T] = {}
        self._near: dict[tuple[int, tuple[str, ...]], list[tuple[str, _T]]] = {}

    def add(self, title: str, value: _T) -> None:
        words = _Words.of(title)
        self._exact.setdefault(words.key, value)
        for i, signature in words.near():
            self._near.setdefault((i, signature), []).append((words.words[i], value))

    def find(self, title: str) -> _T | None:
        words = _Words.of(title)
        found = self._exact.get(words.key)
        if found is not None:
            return found
        for i, signature in words.near():
            for word, value in self._near.get((i, signature), ()):
                if _one_edit(word, words.words[i]):
                    return value
        return None


def similar(a: str, b: str) -> bool:
    """Whether two titles (or insight texts) name the same thing."""
    index: TitleIndex[bool] = TitleIndex()
    index.add(a, True)
    return index.find(b) is not None


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
    """Create (``task_id`` None) or a new version of a known task; ``message``
    is the transcript number of its source (see :class:`ExtractionResult`)."""

    task_id: str | None
    expected_version: int | None
    fields: dict[str, Any]
    message: int | None = None


def merge_mentions(mentions: Sequence[ExtractedTask]) -> ExtractedTask:
    """Mentions of one task, in the order they were written, as one, with
    the result they would have one run after the other: the first one's
    title and message, the last owner and due date given, and the last
    status, except that an open mention does not reopen a done or dropped
    task (see :func:`plan_task_changes`)."""
    status = mentions[0].status
    for mention in mentions[1:]:
        if mention.status != "open":
            status = mention.status
    owner = next((m.owner for m in reversed(mentions) if m.owner), None)
    due = next((m.due for m in reversed(mentions) if m.due), None)
    return mentions[0].model_copy(update={"owner": owner, "due": due, "status": status})


def plan_task_changes(
    found: Sequence[ExtractedTask], known: Sequence[KnownTask]
) -> list[TaskChange]:
    """New tasks, and changes to known ones (done, new owner, new date); a task
    already known as it is gives nothing. Mentions of one task in ``found``
    (in message order) are merged first (:func:`merge_mentions`). A known open
    task is preferred to a closed one of the same title. A creation's source
    is the task's first mention, a change's its last."""
    groups: TitleIndex[list[ExtractedTask]] = TitleIndex()
    ordered: list[list[ExtractedTask]] = []
    for task in found:
        group = groups.find(task.title)
        if group is None:
            group = []
            groups.add(task.title, group)
            ordered.append(group)
        group.append(task)
    known_titles: TitleIndex[KnownTask] = TitleIndex()
    for k in sorted(known, key=lambda k: k.status != "open"):  # stable: open ones first
        known_titles.add(k.title, k)
    changes: list[TaskChange] = []
    for group in ordered:
        task = merge_mentions(group)
        match = known_titles.find(task.title)
        if match is None:
            changes.append(TaskChange(None, None, task.fields(), task.message))
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
            changes.append(TaskChange(match.id, match.version, update, group[-1].message))
    return changes


def new_insights(
    found: Sequence[ExtractedInsight], known_texts: Sequence[str]
) -> list[ExtractedInsight]:
    """The insights of ``found`` that neither a known one nor an earlier one
    of ``found`` says already (the same test as for task titles)."""
    seen: TitleIndex[bool] = TitleIndex()
    for text in known_texts:
        seen.add(text, True)
    out: list[ExtractedInsight] = []
    for insight in found:
        if seen.find(insight.text) is None:
            seen.add(insight.text, True)
            out.append(insight)
    return out


def latest_states(found: Sequence[ExtractedState]) -> list[ExtractedState]:
    """One state per key: the last one given, so a key is written once."""
    last = {state.key: state for state in found}
    return [state for state in found if last[state.key] is state]
