"""Logs: one line per record, JSON or text, with the ids of what it is about.

Every record carries the ids bound in the context it was logged from: the
HTTP request or socket (``request_id``, from the client's ``X-Request-ID`` or
made up), the team, the chat session and the reply. They are context
variables, so a task started while they are bound (a reply's, for one) keeps
them: a reply's records name the request that sent its message.

``CHATHUB_LOG_FORMAT``: ``json`` (one object per line: ``ts``, ``level``,
``logger``, ``message``, the ids that are bound, ``exc`` for a traceback),
``text``, or ``auto`` (the default): text on a terminal, JSON otherwise.

No credential reaches the log, whatever the level (:class:`Redaction`): the
loggers that dump protocol traffic at debug (:data:`TRAFFIC_LOGGERS`) are
kept to info and above even at ``CHATHUB_LOG_LEVEL=debug``, and API keys,
JWTs, ``Bearer`` values and ``"token"`` fields are masked in every message.
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

TRAFFIC_LOGGERS = ("uvicorn.error", "websockets", "aiosqlite")
"""Loggers whose debug records are traffic, not diagnostics: the WebSocket
handshake's headers (``Authorization`` included) and every frame (``auth``
frames included) on ``uvicorn.error``; each SQL statement with its
parameters (message text, key hashes) on ``aiosqlite``. uvicorn sets the
level of ``uvicorn.error`` itself when it starts, so they are dropped by
:class:`Redaction` rather than by a logger level."""

_TRAFFIC_CHILDREN = tuple(name + "." for name in TRAFFIC_LOGGERS)

MASK = "***"
# A "token" (or "access_token", "api_key") field of JSON or of a Python repr,
# up to its closing quote: a frame logged cut short keeps its tail.
_TOKEN_FIELD = re.compile(r"""(["'](?:\w*token|api_key)["']\s*:\s*["'])[^"']*""", re.IGNORECASE)
_BEARER = re.compile(r"""(\bbearer\s+)[^\s'"]+""", re.IGNORECASE)
# An API key keeps its visible prefix (listed by GET /team/api-keys).
_API_KEY = re.compile(r"\b(chk_[0-9a-f]{8}_)[\w-]+|\bchk_[\w-]+")
_JWT = re.compile(r"\beyJ[\w-]*\.[\w-]*(?:\.[\w-]*)?")


def redact(text: str) -> str:
    """``text`` with every credential in it masked."""
    text = _TOKEN_FIELD.sub(rf"\g<1>{MASK}", text)
    text = _BEARER.sub(rf"\g<1>{MASK}", text)
    text = _API_KEY.sub(lambda m: (m.group(1) or "chk_") + MASK, text)
    return _JWT.sub("eyJ" + MASK, text)


class Redaction(logging.Filter):
    """On the handler: drops the debug records of :data:`TRAFFIC_LOGGERS`
    and masks credentials in the message of every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO and (
            record.name in TRAFFIC_LOGGERS or record.name.startswith(_TRAFFIC_CHILDREN)
        ):
            return False
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken record: the handler reports it as it would have
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


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
    handler.addFilter(Redaction())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic lists the plugins it sets up on every run: noise, not progress.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
