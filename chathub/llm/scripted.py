"""The scripted provider: a deterministic stand-in model for tests and benchmarks.

``scripted://`` never talks to a model. It streams a fixed text in fixed-size
chunks at a fixed pace, and can be told to fail in the ways real providers fail,
so the hub's handling of each case can be tested without a network.

Query parameters (all optional; an unknown one is a :class:`ConfigError`):

``text``
    The reply, URL-decoded (``+`` is a space, ``%2B`` a plus). Without it the
    reply is ``You said: <content of the last user turn>``.
``chunk``
    Characters per :class:`TextDelta` (default 4).
``rate``
    Chunks per second (default 0: as fast as possible, still yielding to the
    event loop between bursts, see ``burst``). Chunk *i* is due ``i / rate``
    seconds after the first, so a slow consumer does not make the stream
    slower than scheduled.
``burst``
    At ``rate=0``, the chunks handed over per turn of the event loop (default
    1: the stream yields before every chunk). A model's API that streams
    faster than the server reads hands over many events per network read,
    and the SDKs yield them one after the other without giving the loop a
    turn (hundreds per read at full speed on loopback); ``burst`` models
    that. Ignored when ``rate`` paces the chunks.
``fail_before``
    ``overloaded``, ``rate_limited``, ``timeout``, ``connection`` or
    ``rejected``: raise that :class:`ProviderError` before the first chunk.
``fail_after``
    Raise :class:`ProviderOverloaded` (retryable) after this many chunks.
``fail_times``
    Fail only the first N streams of this provider instance (default: every
    stream). Counts streams that failed, whichever failure was scripted.
``json``
    The object :meth:`ScriptedProvider.structured` returns (URL-encoded JSON).
    Without it, a skeleton of the schema (see :func:`schema_skeleton`).

Token accounting uses :func:`~chathub.llm.base.estimate_tokens` (one token per started four
characters): input over the system prompt and every turn, output over the
characters actually streamed. ``request.max_tokens`` caps the reply at
``max_tokens * 4`` characters; a reply cut there ends with stop reason
``max_tokens``, otherwise ``end_turn``.

Example: ``scripted://?text=Hello%2C+world&chunk=2&rate=50&fail_before=overloaded&fail_times=1``
fails the first stream with a retryable error, then streams ``Hello, world`` in
six two-character chunks over about 0.1 s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from chathub.config import ConfigError
from chathub.llm.base import (
    CompletionRequest,
    ProviderConnection,
    ProviderError,
    ProviderOverloaded,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    StopReason,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    estimate_request_tokens,
)

FAILURES: dict[str, Callable[[], ProviderError]] = {
    "overloaded": lambda: ProviderOverloaded("scripted: overloaded"),
    "rate_limited": lambda: ProviderRateLimited("scripted: rate limited"),
    "timeout": lambda: ProviderTimeout("scripted: timed out"),
    "connection": lambda: ProviderConnection("scripted: connection lost"),
    "rejected": lambda: ProviderRejected("scripted: request rejected"),
}
"""The names ``fail_before`` accepts, and the error each one raises."""

CHARS_PER_TOKEN = 4
_PARAMS = {"text", "chunk", "rate", "burst", "fail_before", "fail_after", "fail_times", "json"}


class ScriptedProvider:
    """Streams a scripted reply; see the module docstring for the rules.

    Deterministic: the same request to providers built from the same URL yields
    the same deltas, usage and stop reason (failures depend on how many streams
    this instance has already failed, when ``fail_times`` is set).
    """

    name = "scripted"
    model = "scripted"

    def __init__(
        self,
        *,
        text: str | None = None,
        chunk: int = 4,
        rate: float = 0.0,
        burst: int = 1,
        fail_before: str | None = None,
        fail_after: int | None = None,
        fail_times: int | None = None,
        structured_result: dict[str, Any] | None = None,
    ) -> None:
        if chunk < 1:
            raise ConfigError(f"scripted://: chunk must be at least 1, got {chunk}")
        if rate < 0:
            raise ConfigError(f"scripted://: rate must not be negative, got {rate}")
        if burst < 1:
            raise ConfigError(f"scripted://: burst must be at least 1, got {burst}")
        if fail_before is not None and fail_before not in FAILURES:
            raise ConfigError(
                f"scripted://: fail_before={fail_before!r} is not one of {', '.join(FAILURES)}"
            )
        if fail_after is not None and fail_after < 0:
            raise ConfigError(f"scripted://: fail_after must not be negative, got {fail_after}")
        if fail_times is not None and fail_times < 0:
            raise ConfigError(f"scripted://: fail_times must not be negative, got {fail_times}")
        self.text = text
        self.chunk = chunk
        self.rate = rate
        self.burst = burst
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.fail_times = fail_times
        self.structured_result = structured_result
        self.failures = 0
        """Streams this instance has failed on purpose so far."""

    @classmethod
    def from_url(cls, url: str) -> ScriptedProvider:
        """Build from a ``scripted://?...`` URL; bad or unknown parameters are a
        :class:`ConfigError` naming them."""
        query = parse_qs(urlsplit(url).query, keep_blank_values=True)
        unknown = sorted(set(query) - _PARAMS)
        if unknown:
            raise ConfigError(
                f"scripted://: unknown parameter(s) {', '.join(unknown)}; "
                f"supported: {', '.join(sorted(_PARAMS))}"
            )

        def last(key: str) -> str | None:
            values = query.get(key)
            return values[-1] if values else None

        def number(key: str, kind: Callable[[str], Any]) -> Any:
            raw = last(key)
            if raw is None:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(f"scripted://: {key}={raw!r} is not a number") from None

        structured_result = None
        raw_json = last("json")
        if raw_json is not None:
            try:
                structured_result = json.loads(raw_json)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"scripted://: json is not valid JSON: {exc}") from None
            if not isinstance(structured_result, dict):
                raise ConfigError("scripted://: json must be a JSON object")

        chunk = number("chunk", int)
        rate = number("rate", float)
        burst = number("burst", int)
        return cls(
            text=last("text"),
            chunk=4 if chunk is None else chunk,
            rate=0.0 if rate is None else rate,
            burst=1 if burst is None else burst,
            fail_before=last("fail_before") or None,
            fail_after=number("fail_after", int),
            fail_times=number("fail_times", int),
            structured_result=structured_result,
        )

    def reply_for(self, request: CompletionRequest) -> str:
        """The full reply this provider streams for ``request``, before the
        ``max_tokens`` cut."""
        if self.text is not None:
            return self.text
        last_user = next((t.content for t in reversed(request.turns) if t.role == "user"), "")
        return f"You said: {last_user}"

    def _should_fail(self) -> bool:
        return self.fail_times is None or self.failures < self.fail_times

    def _fail(self, kind: str) -> ProviderError:
        self.failures += 1
        return FAILURES[kind]()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        if self.fail_before is not None and self._should_fail():
            raise self._fail(self.fail_before)

        reply = self.reply_for(request)
        limit = max(request.max_tokens, 0) * CHARS_PER_TOKEN
        stop_reason: StopReason = "end_turn"
        if len(reply) > limit:
            reply, stop_reason = reply[:limit], "max_tokens"

        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        for index, start in enumerate(range(0, len(reply), self.chunk)):
            if self.fail_after is not None and index == self.fail_after and self._should_fail():
                raise self._fail("overloaded")
            if self.rate > 0:
                await asyncio.sleep(max(0.0, started + index / self.rate - loop.time()))
            elif index % self.burst == 0:
                # Even at full speed a stream must not starve the loop's other tasks.
                await asyncio.sleep(0)
            piece = reply[start : start + self.chunk]
            sent += len(piece)
            yield TextDelta(piece)

        n_chunks = -(-len(reply) // self.chunk)
        if self.fail_after is not None and self.fail_after >= n_chunks and self._should_fail():
            # Scripted to fail after more chunks than the reply has: fail at the end,
            # still before StreamEnd, so "failed after N chunks" holds for any N.
            raise self._fail("overloaded")
        yield StreamEnd(
            stop_reason,
            Usage(
                input_tokens=estimate_request_tokens(request),
                output_tokens=-(-sent // CHARS_PER_TOKEN),
            ),
        )

    async def count_tokens(self, request: CompletionRequest) -> int:
        """:func:`estimate_request_tokens` of ``request``."""
        return estimate_request_tokens(request)

    async def structured(
        self, request: CompletionRequest, *, name: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """The ``json`` parameter's object, or else :func:`schema_skeleton` of
        ``schema``. ``fail_before`` applies here as it does to :meth:`stream`."""
        if self.fail_before is not None and self._should_fail():
            raise self._fail(self.fail_before)
        if self.structured_result is not None:
            return dict(self.structured_result)
        skeleton = schema_skeleton(schema)
        if not isinstance(skeleton, dict):
            raise ProviderRejected(f"scripted: schema for {name!r} is not an object schema")
        return skeleton

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def schema_skeleton(schema: dict[str, Any]) -> Any:
    """The simplest value of a JSON schema: its ``const``, ``default`` or first
    ``enum`` value if any; otherwise ``{}``-with-every-property for objects,
    ``[]``, ``""``, ``0``, ``False`` or ``None`` by ``type``."""
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0] if kind else "object"
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: schema_skeleton(sub) for key, sub in properties.items()}
    return {"array": [], "string": "", "integer": 0, "number": 0, "boolean": False}.get(kind)
