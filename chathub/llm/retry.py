"""Retrying a provider call while nothing has reached the user yet.

A retryable :class:`ProviderError` (rate limit, overload, timeout, connection)
raised *before the first* :class:`TextDelta` costs the user nothing but a delay,
so the request is sent again after an exponential backoff with jitter. Once text
has streamed, a retry would repeat or contradict what the user already saw: the
error propagates and the caller ends the reply as failed, keeping the partial
text. Non-retryable errors (:class:`ProviderRejected`, and any error the
provider marked ``x-should-retry: false``) propagate at once.

When the provider says how long to wait (``Retry-After``, ``retry-after-ms``:
:attr:`ProviderError.retry_after`), the next attempt waits at least that long,
up to :data:`MAX_RETRY_AFTER`. A provider that asks for longer fails the call
at once with its own code (``rate_limited``, ``overloaded``): an earlier retry
would be refused again, and a user watching a reply that has not started is
better told than kept waiting.

The SDK clients are built with ``max_retries=0`` so that this is the only retry
layer and a mid-stream failure is never silently restarted. Every provider
error seen here, retried or not, is counted in ``chathub_provider_errors_total``
by its code.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter

from chathub.llm.base import (
    CompletionRequest,
    LLMProvider,
    ProviderError,
    StreamEvent,
    TextDelta,
)

log = logging.getLogger(__name__)

PROVIDER_ERRORS = Counter(
    "chathub_provider_errors_total", "Provider errors by kind, retried ones too", ["code"]
)

MAX_RETRY_AFTER = 10.0
"""The longest wait a provider's ``Retry-After`` is honoured for, in seconds:
a little above the backoff's own ceiling (8 s), and short enough that a
reply waiting for its first token (twice at most) is not mistaken for a hung
one; a longer wait is better shown to the user as ``rate_limited``."""

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


def backoff_delay(
    attempt: int,
    *,
    base_delay: float,
    max_delay: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry):
    ``min(max_delay, base_delay * 2**attempt)`` scaled by a random factor in
    [0.5, 1.0], so clients that failed together do not retry together."""
    ceiling = min(max_delay, base_delay * 2.0**attempt)
    jitter = rng.random() if rng is not None else random.random()
    return ceiling * (0.5 + 0.5 * jitter)


async def stream_with_retry(
    provider: LLMProvider,
    request: CompletionRequest,
    *,
    attempts: int = 3,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    max_retry_after: float = MAX_RETRY_AFTER,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> AsyncIterator[StreamEvent]:
    """``provider.stream(request)``, sent up to ``attempts`` times.

    Guarantees: the events are those of exactly one attempt (a failed attempt
    yielded no :class:`TextDelta`); a retryable error before the first delta is
    retried after :func:`retry_delay`, unless attempts are exhausted or the
    provider asks to wait longer than ``max_retry_after``; any error after the
    first delta, and any non-retryable error, propagates unchanged. Closing
    this iterator closes the provider's stream. ``sleep`` and ``rng`` are
    injectable so tests need not wait.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        events = provider.stream(request)
        started = False
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    started = True
                yield event
            return
        except ProviderError as exc:
            if started:
                PROVIDER_ERRORS.labels(code=exc.code).inc()
                raise
            delay = _after_failure(
                exc,
                attempt,
                f"{provider.name} stream (before its first token)",
                attempts=attempts,
                base_delay=base_delay,
                max_delay=max_delay,
                max_retry_after=max_retry_after,
                rng=rng,
            )
            if delay is None:
                raise
        finally:
            await _aclose(events)
        await sleep(delay)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    max_retry_after: float = MAX_RETRY_AFTER,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """``await call()``, retried like :func:`stream_with_retry` on a retryable
    :class:`ProviderError`; for one-shot calls such as ``count_tokens`` and
    ``structured``, which show the user nothing until they return."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        try:
            return await call()
        except ProviderError as exc:
            delay = _after_failure(
                exc,
                attempt,
                "provider call",
                attempts=attempts,
                base_delay=base_delay,
                max_delay=max_delay,
                max_retry_after=max_retry_after,
                rng=rng,
            )
            if delay is None:
                raise
        await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def retry_delay(
    error: ProviderError,
    attempt: int,
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    max_retry_after: float = MAX_RETRY_AFTER,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before sending again after attempt number ``attempt``
    (from 0) failed with ``error``, or None when the call fails now: the error
    is not retryable, it was the last of ``attempts``, or the provider asks to
    wait longer than ``max_retry_after``. The wait is :func:`backoff_delay`, or
    the provider's ``retry_after`` where that is longer."""
    if not error.retryable or attempt >= attempts - 1:
        return None
    delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay, rng=rng)
    if error.retry_after is None:
        return delay
    if error.retry_after > max_retry_after:
        return None
    return max(delay, error.retry_after)


def _after_failure(
    error: ProviderError,
    attempt: int,
    what: str,
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    max_retry_after: float,
    rng: random.Random | None,
) -> float | None:
    """:func:`retry_delay`, with ``error`` counted and the decision logged."""
    PROVIDER_ERRORS.labels(code=error.code).inc()
    delay = retry_delay(
        error,
        attempt,
        attempts=attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        max_retry_after=max_retry_after,
        rng=rng,
    )
    if delay is not None:
        log.warning(
            "%s failed (%s: %s); retry %d/%d in %.2fs",
            what,
            error.code,
            error.message,
            attempt + 1,
            attempts - 1,
            delay,
        )
    elif error.retryable and error.retry_after is not None and attempt < attempts - 1:
        log.warning(
            "%s failed (%s: %s); the provider asks to wait %.1fs, over %.1fs: not retrying",
            what,
            error.code,
            error.message,
            error.retry_after,
            max_retry_after,
        )
    return delay


async def _aclose(events: AsyncIterator[StreamEvent]) -> None:
    # The protocol promises `aclose`; a plain iterator without it has nothing to release.
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
