"""Retrying a provider call while nothing has reached the user yet.

A retryable :class:`ProviderError` (rate limit, overload, timeout, connection)
raised *before the first* :class:`TextDelta` costs the user nothing but a delay,
so the request is sent again after an exponential backoff with jitter. Once text
has streamed, a retry would repeat or contradict what the user already saw: the
error propagates and the caller ends the reply as failed, keeping the partial
text. Non-retryable errors (:class:`ProviderRejected`) propagate at once.

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
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> AsyncIterator[StreamEvent]:
    """``provider.stream(request)``, sent up to ``attempts`` times.

    Guarantees: the events are those of exactly one attempt (a failed attempt
    yielded no :class:`TextDelta`); a retryable error before the first delta is
    retried after :func:`backoff_delay`, unless attempts are exhausted; any error
    after the first delta, and any non-retryable error, propagates unchanged.
    Closing this iterator closes the provider's stream. ``sleep`` and ``rng`` are
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
            PROVIDER_ERRORS.labels(code=exc.code).inc()
            if started or not exc.retryable or attempt == attempts - 1:
                raise
            delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay, rng=rng)
            log.warning(
                "%s stream failed before its first token (%s: %s); retry %d/%d in %.2fs",
                provider.name,
                exc.code,
                exc.message,
                attempt + 1,
                attempts - 1,
                delay,
            )
        finally:
            await _aclose(events)
        await sleep(delay)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
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
            PROVIDER_ERRORS.labels(code=exc.code).inc()
            if not exc.retryable or attempt == attempts - 1:
                raise
            delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay, rng=rng)
            log.warning(
                "provider call failed (%s: %s); retry %d/%d in %.2fs",
                exc.code,
                exc.message,
                attempt + 1,
                attempts - 1,
                delay,
            )
        await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


async def _aclose(events: AsyncIterator[StreamEvent]) -> None:
    # The protocol promises `aclose`; a plain iterator without it has nothing to release.
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
