"""Field checks shared by every dashboard writer (REST and extraction), so
that all of them store the same shapes; a bad value is BadRequest."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from chathub.errors import BadRequest

TASK_STATUSES = ("open", "done", "dropped")
AUTHOR_KINDS = ("user", "model", "extractor")
TASK_FIELDS = frozenset({"title", "owner", "due", "status"})
INSIGHT_FIELDS = frozenset({"text", "kind"})
DUE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
STATE_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"
INSIGHT_KIND_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
MAX_TITLE = 500
MAX_OWNER = 200
MAX_INSIGHT_TEXT = 10_000
MAX_SUMMARY_TEXT = 100_000


def check_due(due: str | None) -> str | None:
    """``due`` as a calendar date ``YYYY-MM-DD`` (or None); BadRequest else."""
    if due is None:
        return None
    if not isinstance(due, str) or not re.fullmatch(DUE_PATTERN, due):
        raise BadRequest("due must be a date as YYYY-MM-DD")
    try:
        date.fromisoformat(due)
    except ValueError as exc:
        raise BadRequest(f"due is not a real date: {due}") from exc
    return due


def _check_text(name: str, value: Any, *, max_length: int, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    text = value.strip()
    if not text:
        raise BadRequest(f"{name} must not be empty")
    if len(text) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    return text


def _check_status(status: Any) -> str:
    if status not in TASK_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(TASK_STATUSES)}")
    return str(status)


def _check_author(author_kind: str) -> None:
    if author_kind not in AUTHOR_KINDS:
        raise BadRequest(f"author_kind must be one of {', '.join(AUTHOR_KINDS)}")


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not re.fullmatch(INSIGHT_KIND_PATTERN, kind):
        raise BadRequest("kind must be lowercase letters, digits, '_' or '-' (at most 32)")
    return kind


def check_state_key(key: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(STATE_KEY_PATTERN, key):
        raise BadRequest("state key must be 1-200 of A-Z a-z 0-9 _ . : - (not starting with one)")
    return key


def _task_fields(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changes) - TASK_FIELDS
    if unknown:
        raise BadRequest(f"unknown task fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "title":
            checked[name] = _check_text("title", value, max_length=MAX_TITLE)
        elif name == "owner":
            checked[name] = _check_text("owner", value, max_length=MAX_OWNER, optional=True)
        elif name == "due":
            checked[name] = check_due(value)
        else:
            checked[name] = _check_status(value)
    return checked


def _insight_fields(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changes) - INSIGHT_FIELDS
    if unknown:
        raise BadRequest(f"unknown insight fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "text":
            checked[name] = _check_text("text", value, max_length=MAX_INSIGHT_TEXT)
        else:
            checked[name] = _check_kind(value)
    return checked
