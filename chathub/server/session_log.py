"""The session event log: the single source of ``seq``.

Every event of a chat session is appended here and gets the next ``seq`` of
its session; listeners on this instance are called with each appended event,
in ``seq`` order per session. ``read_after`` serves reconnecting clients from a
bounded window: it answers ``None`` when events after ``after_seq`` are no
longer all held, so the client knows to reload over REST.

Implementations: :class:`MemorySessionLog` (embedded default, one process) and
the Redis one (``chathub.server.redis_log``), chosen by ``create_session_log``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from chathub.config import Settings
from chathub.errors import Unavailable

logger = logging.getLogger("chathub.log")

REPLY_ENDINGS = frozenset({"reply.completed", "reply.failed"})


class LogUnavailable(Unavailable):
    """The log could not take an event: its store (Redis) stayed unreachable
    for as long as an append waits for it (``append_patience_s``)."""


class StaleReply(Exception):
    """An event of a reply that no longer has its session: another instance
    ended it (its owner stopped renewing the lease, paused or cut off) or
    started the session's next reply. The Redis log refuses it; the
    in-process log serves one process, where no other instance can end a
    reply, and keeps no fence."""


def reply_fence(type: str, data: dict[str, Any]) -> tuple[str, str] | None:
    """How an event bears on its session's current reply: ``("start", id)``
    for ``reply.started``, ``("end", id)`` for its ending, ``("check", id)``
    for the events in between (deltas, steps, guardrail actions), which only
    the session's current reply may append; None for any other event."""
    reply_id = data.get("reply_id")
    if not type.startswith("reply.") or not isinstance(reply_id, str):
        return None
    if type == "reply.started":
        return "start", reply_id
    return ("end" if type in REPLY_ENDINGS else "check"), reply_id


@dataclass(frozen=True, slots=True)
class Event:
    """One session event, encoded once: ``frame`` is the JSON text sent to
    every socket and kept in the log."""

    session_id: str
    seq: int
    type: str
    frame: str

    @classmethod
    def build(cls, session_id: str, seq: int, type: str, data: dict[str, Any]) -> Event:
        body = {"type": type, "session_id": session_id, "seq": seq, **data}
        return cls.of(session_id, seq, type, orjson.dumps(body).decode())

    @classmethod
    def of(cls, session_id: str, seq: int, type: str, frame: str) -> Event:
        """``Event(session_id, seq, type, frame)`` for the per-token path:
        the frozen dataclass's own ``__init__`` sets each field through
        ``object.__setattr__``, a third of what building an event costs."""
        event: Event = _new(cls)
        _set_session_id(event, session_id)
        _set_seq(event, seq)
        _set_type(event, type)
        _set_frame(event, frame)
        return event

    def data(self) -> dict[str, Any]:
        decoded: dict[str, Any] = orjson.loads(self.frame)
        return decoded


_new = object.__new__
_set_session_id = Event.__dict__["session_id"].__set__
_set_seq = Event.__dict__["seq"].__set__
_set_type = Event.__dict__["type"].__set__
_set_frame = Event.__dict__["frame"].__set__

Listener = Callable[[Event], None]


class SessionLog(Protocol):
    async def append(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        """Append an event with the session's next ``seq``; listeners on this
        instance receive it (for the memory log, before this returns). While
        the store is unreachable, wait for it (the Redis log: up to
        ``append_patience_s``, trying the same append again, never twice),
        then raise :class:`LogUnavailable`."""
        ...

    async def read_after(self, session_id: str, after_seq: int) -> list[Event] | None:
        """Every held event with ``seq > after_seq``, in order; ``None`` when
        some of them are no longer held (or ``after_seq`` is in the future)."""
        ...

    async def held(self, session_id: str) -> list[Event]:
        """Every event still held for the session, in ``seq`` order (the
        oldest may be long gone; there may be gaps where a floor was set)."""
        ...

    async def last_seq(self, session_id: str) -> int: ...

    async def ensure_floor(self, session_id: str, seq: int) -> None:
        """Make sure the next ``seq`` is above ``seq`` (the last one stored in
        the database), so that a log that lost its state never reuses one."""
        ...

    def add_listener(self, listener: Listener) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...


@dataclass
class _Window:
    next_seq: int
    events: deque[Event]
    touched: float


class MemorySessionLog:
    """In-process log: a bounded deque per session, idle sessions expire.

    An expired window leaves only its counter behind, and at most
    ``max_counters`` of those (the least recently used go first): a session
    whose counter went too is floored again from the database before anyone
    joins it or sends to it (``ensure_floor``)."""

    def __init__(
        self, *, max_length: int = 10_000, ttl_s: float = 86_400, max_counters: int = 100_000
    ) -> None:
        self.max_length = max_length
        self.ttl_s = ttl_s
        self.max_counters = max_counters
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._counters: OrderedDict[str, int] = OrderedDict()  # expired: next seq
        self._listeners: list[Listener] = []
        self._expired_at = 0.0

    def _window(self, session_id: str) -> _Window:
        window = self._windows.get(session_id)
        now = time.monotonic()
        if window is None:
            next_seq = self._counters.pop(session_id, 1)
            window = _Window(next_seq, events=deque(maxlen=self.max_length), touched=now)
            self._windows[session_id] = window
        else:
            window.touched = now
            self._windows.move_to_end(session_id)
        # Not on every append (a hot path): a few times per TTL is enough.
        if now - self._expired_at >= min(1.0, self.ttl_s / 4):
            self._expired_at = now
            self._expire(now)
        return window

    def _expire(self, now: float) -> None:
        while self._windows:
            oldest_id, oldest = next(iter(self._windows.items()))
            if now - oldest.touched < self.ttl_s:
                break
            # Keep the counter: a forgotten window would restart seq at 1.
            del self._windows[oldest_id]
            counters = self._counters
            counters[oldest_id] = oldest.next_seq
            if len(counters) > self.max_counters:
                counters.popitem(last=False)

    async def append(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        return self.append_now(session_id, type, data)

    def append_now(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        """:meth:`append` without awaiting: nothing else can run in between,
        which lets the reply stream skip the care a remote log needs."""
        window = self._window(session_id)
        event = Event.build(session_id, window.next_seq, type, data)
        window.next_seq += 1
        window.events.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("session log listener failed")
        return event

    async def read_after(self, session_id: str, after_seq: int) -> list[Event] | None:
        window = self._window(session_id)
        last = window.next_seq - 1
        if after_seq > last:
            return None
        if after_seq == last:
            return []
        events = window.events
        if not events or events[0].seq > after_seq + 1:
            return None
        start = after_seq + 1 - events[0].seq
        return [events[i] for i in range(start, len(events))]

    async def held(self, session_id: str) -> list[Event]:
        return list(self._window(session_id).events)

    async def last_seq(self, session_id: str) -> int:
        return self._window(session_id).next_seq - 1

    async def ensure_floor(self, session_id: str, seq: int) -> None:
        window = self._window(session_id)
        if window.next_seq <= seq:
            window.next_seq = seq + 1
            # No read may span the skipped seqs: drop what came before them.
            window.events.clear()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._windows.clear()
        self._counters.clear()

    async def ready(self) -> bool:
        return True


def create_session_log(settings: Settings) -> SessionLog:
    """``CHATHUB_REDIS_LOG_SHARDS`` set: Redis Streams sharded over those;
    else ``CHATHUB_REDIS_URL`` set: Redis Streams there; else in-process."""
    if settings.redis_log_shards:
        from chathub.server.redis_log import ShardedSessionLog

        return ShardedSessionLog(
            settings.redis_log_shards,
            max_length=settings.session_log_length,
            ttl_s=settings.session_log_ttl_s,
            prefix=settings.redis_prefix,
        )
    if settings.redis_url:
        from chathub.server.redis_log import RedisSessionLog

        return RedisSessionLog(
            settings.redis_url,
            max_length=settings.session_log_length,
            ttl_s=settings.session_log_ttl_s,
            prefix=settings.redis_prefix,
        )
    return MemorySessionLog(
        max_length=settings.session_log_length, ttl_s=settings.session_log_ttl_s
    )
