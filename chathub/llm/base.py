"""The provider interface: one async stream of events per completion.

    ProviderError (retryable: bool, code)
    ├── ProviderRateLimited   retryable, code "rate_limited"
    ├── ProviderOverloaded    retryable, code "overloaded"
    ├── ProviderTimeout       retryable, code "timeout"
    ├── ProviderConnection    retryable, code "connection"
    ├── ProviderRejected      not retryable, code "provider_rejected" (4xx: bad request, auth)
    └── ProviderPreempted     not retryable, code "preempted" (background work stopped
                              for a user's reply: its owner runs it again later)

SDK exceptions never leave ``chathub.llm``: each provider maps them here,
with what the response said about trying again (:func:`with_retry_advice`).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Role = Literal["user", "assistant"]
StopReason = Literal["end_turn", "max_tokens", "cancelled", "blocked", "error"]


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True)
class CompletionRequest:
    """What to send: a system prompt and alternating turns ending with the user's."""

    turns: list[ChatTurn]
    system: str = ""
    model: str | None = None
    temperature: float = 0.7
    max_tokens: int = 1024
    background: bool = False
    """Work no user is waiting for (extraction, summaries). A provider that
    runs one generation at a time (``local://``) runs it after the
    interactive ones and stops it for them (:class:`ProviderPreempted`);
    the others ignore it."""


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class StreamEnd:
    stop_reason: StopReason
    usage: Usage = field(default_factory=Usage)


StreamEvent = TextDelta | StreamEnd


def estimate_tokens(text: str) -> int:
    """The rough rule used where no tokenizer is at hand: one token per started
    four characters (``ceil(len(text) / 4)``); 0 for the empty string."""
    return estimate_tokens_of(len(text))


def estimate_tokens_of(chars: int) -> int:
    """:func:`estimate_tokens` of a text of ``chars`` characters."""
    return -(-chars // 4)


def estimate_request_tokens(request: CompletionRequest) -> int:
    """:func:`estimate_tokens` over the system prompt and every turn's content."""
    return estimate_tokens(request.system) + sum(
        estimate_tokens(turn.content) for turn in request.turns
    )


class ProviderError(Exception):
    code: str = "provider_error"
    retry_after: float | None = None
    """Seconds the provider asked to wait before the next attempt (its
    ``retry-after-ms`` or ``Retry-After`` header); None when it did not say."""
    input_tokens: int | None = None
    output_tokens: int | None = None
    """The provider's own counts for the failed call, where they arrived
    before it failed (Anthropic's ``message_start`` carries the input's);
    None for a count that never came."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class ProviderRateLimited(ProviderError):
    code = "rate_limited"

    def __init__(self, message: str = "provider rate limit") -> None:
        super().__init__(message, retryable=True)


class ProviderOverloaded(ProviderError):
    code = "overloaded"

    def __init__(self, message: str = "provider overloaded") -> None:
        super().__init__(message, retryable=True)


class ProviderTimeout(ProviderError):
    code = "timeout"

    def __init__(self, message: str = "provider timed out") -> None:
        super().__init__(message, retryable=True)


class ProviderConnection(ProviderError):
    code = "connection"

    def __init__(self, message: str = "cannot reach provider") -> None:
        super().__init__(message, retryable=True)


class ProviderRejected(ProviderError):
    code = "provider_rejected"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ProviderPreempted(ProviderError):
    """A background generation (:attr:`CompletionRequest.background`) stopped
    for an interactive one. Not retried by :mod:`chathub.llm.retry`: a retry
    would only queue behind the reply that stopped it; the work's owner
    schedules it again."""

    code = "preempted"

    def __init__(self, message: str = "stopped for a user's reply") -> None:
        super().__init__(message, retryable=False)


def retry_after_of(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds a response's headers ask to wait before trying again:
    ``retry-after-ms`` (milliseconds, OpenAI's and Anthropic's), else
    ``Retry-After`` (seconds, or an HTTP date; ``now`` is the epoch time to
    count from). Never negative; None when neither says anything usable."""
    raw_ms = headers.get("retry-after-ms")
    raw = headers.get("retry-after")
    seconds: float | None = None
    if raw_ms is not None:
        seconds = _number(raw_ms)
        if seconds is not None:
            seconds /= 1000
    if seconds is None and raw is not None:
        seconds = _number(raw)
        if seconds is None:
            try:
                date = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            if date.tzinfo is None:  # "-0000"; an HTTP date is always UTC
                date = date.replace(tzinfo=dt.UTC)
            seconds = date.timestamp() - (time.time() if now is None else now)
    return None if seconds is None else max(0.0, seconds)


def with_retry_advice(error: ProviderError, headers: Mapping[str, str]) -> ProviderError:
    """``error`` with what the response ``headers`` say about trying again:
    :attr:`ProviderError.retry_after` (:func:`retry_after_of`), and not
    retryable at all when the provider says ``x-should-retry: false``.
    (``true`` changes nothing: whether a failure is transient is decided by
    its kind.)"""
    error.retry_after = retry_after_of(headers)
    if headers.get("x-should-retry", "").strip().lower() == "false":
        error.retryable = False
    return error


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return None if math.isnan(value) else value


class LLMProvider(Protocol):
    """A streaming chat model.

    ``stream`` yields zero or more :class:`TextDelta` then exactly one
    :class:`StreamEnd`, or raises :class:`ProviderError`. Closing the iterator
    early (``aclose``) stops generation promptly.
    """

    name: str
    model: str

    def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]: ...

    async def ready(self) -> bool:
        """Cheap readiness check (no tokens spent)."""
        ...

    async def aclose(self) -> None: ...


def parse_json_object(raw: str, *, source: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, or :class:`ProviderRejected` saying what
    came back instead (``source`` names the provider and tool)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProviderRejected(f"{source}: not valid JSON ({exc}): {raw[:200]!r}") from None
    if not isinstance(value, dict):
        raise ProviderRejected(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


@runtime_checkable
class TokenCounter(Protocol):
    """A provider that can measure a request before sending it (context budgeting)."""

    async def count_tokens(self, request: CompletionRequest) -> int:
        """Input tokens ``request`` would cost (system prompt and turns), or raise
        :class:`ProviderError`."""
        ...


@runtime_checkable
class StructuredOutput(Protocol):
    """A provider that can answer with a JSON object matching a schema (extraction)."""

    async def structured(
        self, request: CompletionRequest, *, name: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """The object the model produced for ``request``, named ``name`` and meant to
        match the JSON ``schema``. Raises :class:`ProviderRejected` when the model's
        answer is not a JSON object; validating it against ``schema`` is the caller's job."""
        ...
