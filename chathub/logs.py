"""Logs: one line per record, JSON or text, with the ids of what it is about.

Every record carries the ids bound in the context it was logged from: the
HTTP request or socket (``request_id``, from the client's ``X-Request-ID`` or
made up), the team, the chat session and the reply. They are context
variables, so a task started while they are bound (a reply's, for one) keeps
them: a reply's records name the request that sent its message.

``CHATHUB_LOG_FORMAT``: ``json`` (one object per line: ``ts``, ``level``,
``logger``, ``message``, the ids that are bound, ``exc`` for a traceback),
``text``, or ``auto`` (the default): text on a terminal, JSON otherwise.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from types import EllipsisType

import orjson

from chathub.ids import new_id

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
team_id: ContextVar[str | None] = ContextVar("team_id", default=None)
session_id: ContextVar[str | None] = ContextVar("session_id", default=None)
reply_id: ContextVar[str | None] = ContextVar("reply_id", default=None)

_IDS: tuple[tuple[str, ContextVar[str | None]], ...] = (
    ("request_id", request_id),
    ("team_id", team_id),
    ("session_id", session_id),
    ("reply_id", reply_id),
)

#: A client's request id is taken as it is when it looks like one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def bind(
    *,
    request: str | EllipsisType | None = ...,
    team: str | EllipsisType | None = ...,
    session: str | EllipsisType | None = ...,
    reply: str | EllipsisType | None = ...,
) -> None:
    """Bind ids in the current context: a value, or None to clear one; the
    ids not named stay as they are."""
    for value, var in (
        (request, request_id),
        (team, team_id),
        (session, session_id),
        (reply, reply_id),
    ):
        if value is not ...:
            var.set(value)


def request_id_from(header: bytes | None) -> str:
    """The client's ``X-Request-ID`` if it is a sane one, else a new id."""
    if header:
        text = header.decode("latin-1")
        if _CLIENT_REQUEST_ID.fullmatch(text):
            return text
    return new_id()


def _ids() -> dict[str, str]:
    return {name: value for name, var in _IDS if (value := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_ids())
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _ids()
        if not ids:
            return text
        first, newline, rest = text.partition("\n")
        tail = " ".join(f"{name}={value}" for name, value in ids.items())
        return f"{first} [{tail}]{newline}{rest}"


def configure(level: str, log_format: str) -> None:
    """Send every logger's records (uvicorn's too) to stderr, one per line."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic lists the plugins it sets up on every run: noise, not progress.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
