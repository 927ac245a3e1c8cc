"""One reply's way from the provider's tokens to the session log.

Tokens pass the streaming output guardrail (a hold-back filter that redacts
or blocks patterns split across any number of tokens), then the coalescer
(one ``reply.delta`` every ``coalesce_s`` or ``coalesce_chars``), then the
log. Guarantees: the deltas appended, concatenated, are :attr:`text`; no
redacted span ever reaches the log; after a block nothing more is written
but the policy's safe message.

With coalescing on, a token is only collected: the filter sees the tokens
of a delta together, once the delta is due (``coalesce_s`` after its first
token, or ``coalesce_chars`` collected). The filter's output does not depend
on how its input is cut, so the text is the same; a token then costs an
append instead of a filter step. With coalescing off every token goes
through the filter at once, and every release is a delta.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

from chathub.llm.guardrails import FilterOutput, HoldbackFilter, Policy
from chathub.server import metrics
from chathub.server.session_log import Event, SessionLog

AppendNow = Callable[[str, str, dict[str, Any]], Event]
_SURROGATE = re.compile("[\ud800-\udfff]")


def _paragraph_after(text: str) -> str:
    """What starts a new paragraph after ``text`` (nothing at the start)."""
    if not text or text.endswith("\n\n"):
        return ""
    return "\n" if text.endswith("\n") else "\n\n"


class DeltaWriter:
    def __init__(
        self,
        *,
        log: SessionLog,
        session_id: str,
        reply_id: str,
        policy: Policy,
        holdback_chars: int,
        holdback_ms: float,
        coalesce_s: float,
        coalesce_chars: int,
    ) -> None:
        self.log = log
        self.session_id = session_id
        self.reply_id = reply_id
        self.policy = policy
        self.filter = HoldbackFilter(
            policy, holdback_chars=holdback_chars, holdback_ms=holdback_ms or math.inf
        )
        self.coalesce_s = coalesce_s
        self.coalesce_chars = coalesce_chars
        self.sent: list[str] = []
        self.last_seq = 0
        """The seq of the last event appended here."""
        self.blocked = False
        self._buffer: list[str] = []
        self._buffered = 0
        self._buffered_at = 0.0
        self._half = ""  # the first half of a surrogate pair, for the next token
        self._raw: list[str] = []  # tokens collected for the next delta
        self._raw_chars = 0
        self._raw_timer: asyncio.TimerHandle | None = None
        self._pending: list[tuple[str, str]] = []  # guardrail actions to announce
        self._lock = asyncio.Lock()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_write: asyncio.Task[None] | None = None
        # Set when a write in the background failed (the reply no longer
        # holds its session, or the log stayed unreachable): the next token,
        # or finish, raises it. Nothing is written after it, so the deltas
        # written stay the reply's text with no hole in it.
        self._failed: Exception | None = None
        self._loop = asyncio.get_running_loop()
        # An in-process log appends without awaiting; see _flush_now.
        self._append_now: AppendNow | None = getattr(log, "append_now", None)

    @property
    def text(self) -> str:
        return "".join(self.sent)

    async def write(self, token: str) -> None:
        """One provider token."""
        if self.take(token):
            await self.write_due()

    def take(self, token: str) -> bool:
        """:meth:`write` without awaiting, for the per-token path: True when
        a delta is due that needs :meth:`write_due` (a log that appends by
        awaiting); else the token is fully handled."""
        if self._failed is not None:
            raise self._failed
        if self.blocked:
            return False
        if self._half or not token.isascii():
            token = self._whole_code_points(token)
            if not token:
                return False
        if self.coalesce_s > 0:
            if not self._raw:
                self._raw_timer = self._loop.call_later(self.coalesce_s, self._raw_due)
            self._raw.append(token)
            self._raw_chars += len(token)
            if self._raw_chars < self.coalesce_chars:
                return False
            self._filter_raw(self._loop.time())
            due = bool(self._buffer or self._pending)
        else:
            now = self._loop.time()
            due = self._accept(self.filter.feed(token, now), now)
        if due:
            if not self._can_flush_now():
                return True
            self._flush_now(self._append_now)  # type: ignore[arg-type]
        self._arm_poll()
        return False

    def _whole_code_points(self, token: str) -> str:
        """``token`` as whole code points. Some proxies cut text by UTF-16
        unit, so an emoji's surrogate pair can arrive split across two
        deltas: the first half waits for the second, and a half with no
        partner becomes U+FFFD (no JSON encoder takes a lone surrogate)."""
        token, self._half = self._half + token, ""
        if not _SURROGATE.search(token):
            return token
        if "\ud800" <= token[-1] <= "\udbff":
            token, self._half = token[:-1], token[-1]
        return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    async def write_due(self) -> None:
        """Write the delta :meth:`take` found due."""
        await self._flush()
        self._arm_poll()

    def _filter_raw(self, now: float) -> None:
        """Pass the collected tokens through the filter, as one chunk."""
        if self._raw_timer is not None:
            self._raw_timer.cancel()
            self._raw_timer = None
        if self._raw:
            chunk = "".join(self._raw)
            self._raw.clear()
            self._raw_chars = 0
            if not self.blocked:
                self._accept(self.filter.feed(chunk, now), now)

    def _raw_due(self) -> None:
        """The coalescing time of the collected tokens is over: filter them
        and write what the filter releases."""
        self._raw_timer = None
        self._filter_raw(self._loop.time())
        if self._buffer or self._pending:
            if self._can_flush_now():
                self._flush_now(self._append_now)  # type: ignore[arg-type]
            else:
                self._spawn_flush()
        self._arm_poll()

    def _can_flush_now(self) -> bool:
        return self._append_now is not None and not self._tasks and not self._lock.locked()

    async def finish(self, *, complete: bool = True) -> None:
        """End of the stream: release what the filter holds, write the rest.
        A stream cut short (``complete=False``: cancelled, failed) releases
        nothing of the open candidate: the word being typed is dropped, and
        a pattern in the making is sent as its replacement (see
        ``HoldbackFilter.flush``). Idempotent."""
        for timer in (self._flush_timer, self._poll_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._poll_timer = None
        if self._half and not self.blocked:
            self._half = ""
            self.take("\ufffd")  # a first half the stream never completed
        self._filter_raw(self._loop.time())
        if not self.blocked and not self.filter.blocked:
            try:
                out = self.filter.flush(self._loop.time(), complete=complete)
            except RuntimeError:  # already flushed
                out = FilterOutput()
            self._accept(out, self._loop.time())
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._failed is not None:
            raise self._failed
        await self._flush()

    def _accept(self, out: FilterOutput, now: float) -> bool:
        """Take the filter's output into the buffer (synchronously, so order is
        kept); True when the buffer should be written now."""
        if out.text:
            if not self._buffer:
                self._buffered_at = now
                if self.coalesce_s > 0:
                    self._flush_timer = self._loop.call_later(self.coalesce_s, self._flush_later)
            self._buffer.append(out.text)
            self._buffered += len(out.text)
        if out.actions:
            self._pending.extend(out.actions)
        if out.blocked and not self.blocked:
            self.blocked = True
            notice = _paragraph_after(self._last_text()) + self.policy.safe_message
            self._buffer.append(notice)
            self._buffered += len(notice)
        return bool(
            self._pending
            or self.blocked
            or (
                self._buffer
                and (
                    self.coalesce_s <= 0
                    or self._buffered >= self.coalesce_chars
                    or now - self._buffered_at >= self.coalesce_s
                )
            )
        )

    def _spawn_flush(self) -> None:
        task = self._loop.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, Exception) and self._failed is None:
            self._failed = error

    def _flush_later(self) -> None:
        self._flush_timer = None
        if self._buffer:
            self._spawn_flush()

    def _arm_poll(self) -> None:
        """Held text is looked at again when its hold-back time is up even
        if no token comes (the limit may release it as a redaction). Held
        text whose time is up already waits for the next token."""
        if self._poll_timer is not None or self.blocked:
            return
        deadline = self.filter.deadline
        if deadline is not None and deadline > self._loop.time():
            self._poll_timer = self._loop.call_at(deadline, self._poll)

    def _poll(self) -> None:
        self._poll_timer = None
        now = self._loop.time()
        if self._accept(self.filter.poll(now), now):
            self._spawn_flush()
        self._arm_poll()

    async def _append_delta(self, text: str) -> None:
        event = await self.log.append(
            self.session_id, "reply.delta", {"reply_id": self.reply_id, "text": text}
        )
        self.sent.append(text)
        self.last_seq = max(self.last_seq, event.seq)

    def _last_text(self) -> str:
        """The last piece of text written or waiting to be: what the safe
        message follows."""
        for piece in reversed(self._buffer):
            if piece:
                return piece
        for piece in reversed(self.sent):
            if piece:
                return piece
        return ""

    def _take_buffer(self) -> str:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return text

    def _take_actions(self) -> list[tuple[str, dict[str, Any]]]:
        actions, self._pending = self._pending, []
        events = []
        for action, rule in actions:
            metrics.GUARDRAIL_ACTIONS.labels(action=action, rule=rule).inc()
            events.append(
                ("reply.guardrail", {"reply_id": self.reply_id, "action": action, "rule": rule})
            )
        return events

    def _flush_now(self, append_now: AppendNow) -> None:
        """:meth:`_flush` for a log that appends without awaiting: nothing can
        interleave or be cut off by a cancel, so no lock, task or shield (the
        cost of a delta with coalescing off is mostly those)."""
        if self._buffer:
            text = self._take_buffer()
            event = append_now(
                self.session_id, "reply.delta", {"reply_id": self.reply_id, "text": text}
            )
            self.sent.append(text)
            self.last_seq = event.seq
        for type_, data in self._take_actions():
            self.last_seq = append_now(self.session_id, type_, data).seq

    async def _flush(self) -> None:
        """Write the buffer as one ``reply.delta``, then any guardrail events;
        ordered by a lock. After a failed write, nothing more is written."""
        async with self._lock:
            if self._last_write is not None and not self._last_write.done():
                # A write cut off by a cancel goes first: deltas stay in order.
                await asyncio.shield(self._last_write)
            if self._failed is not None:
                raise self._failed
            if self._buffer:
                text = self._take_buffer()
                # Shielded: a cancel arriving mid-append must not lose track
                # of text the log may already hold.
                write = self._last_write = self._loop.create_task(self._append_delta(text))
                self._tasks.add(write)
                write.add_done_callback(self._flushed)
                await asyncio.shield(write)
            elif self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            try:
                for type_, data in self._take_actions():
                    event = await self.log.append(self.session_id, type_, data)
                    self.last_seq = max(self.last_seq, event.seq)
            except Exception as exc:
                self._failed = self._failed or exc
                raise
