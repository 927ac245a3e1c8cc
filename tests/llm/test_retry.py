"""Retries happen before the first token only, with bounded, jittered backoff."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    ProviderOverloaded,
    ProviderPreempted,
    ProviderRateLimited,
    ProviderRejected,
    StreamEnd,
    StreamEvent,
    TextDelta,
    retry_after_of,
    with_retry_advice,
)
from chathub.llm.factory import create_provider
from chathub.llm.retry import (
    MAX_RETRY_AFTER,
    backoff_delay,
    call_with_retry,
    retry_delay,
    stream_with_retry,
)
from chathub.llm.scripted import ScriptedProvider

REQUEST = CompletionRequest(turns=[ChatTurn("user", "hi")])


class Sleeps:
    """Records the delays instead of waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def scripted(url: str) -> ScriptedProvider:
    provider = create_provider(url)
    assert isinstance(provider, ScriptedProvider)
    return provider


async def test_retries_a_failure_before_the_first_delta() -> None:
    provider = scripted("scripted://?text=fine&fail_before=overloaded&fail_times=2")
    sleeps = Sleeps()
    retrying = stream_with_retry(provider, REQUEST, attempts=3, base_delay=1, sleep=sleeps)
    events = [e async for e in retrying]
    assert events[0] == TextDelta("fine")
    assert isinstance(events[-1], StreamEnd)
    assert provider.failures == 2
    assert len(sleeps.delays) == 2
    # Exponential with jitter in [0.5, 1] of 1 s, then of 2 s.
    assert 0.5 <= sleeps.delays[0] <= 1.0
    assert 1.0 <= sleeps.delays[1] <= 2.0


async def test_gives_up_after_the_last_attempt() -> None:
    provider = scripted("scripted://?fail_before=rate_limited")
    sleeps = Sleeps()
    with pytest.raises(ProviderRateLimited):
        async for _ in stream_with_retry(provider, REQUEST, attempts=3, sleep=sleeps):
            pass
    assert provider.failures == 3
    assert len(sleeps.delays) == 2


async def test_a_failure_after_the_first_delta_is_not_retried() -> None:
    provider = scripted("scripted://?text=abcdefgh&fail_after=1")
    sleeps = Sleeps()
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderOverloaded):
        async for event in stream_with_retry(provider, REQUEST, sleep=sleeps):
            seen.append(event)
    assert seen == [TextDelta("abcd")]
    assert provider.failures == 1
    assert sleeps.delays == []


async def test_a_non_retryable_error_propagates_at_once() -> None:
    provider = scripted("scripted://?fail_before=rejected")
    sleeps = Sleeps()
    with pytest.raises(ProviderRejected):
        async for _ in stream_with_retry(provider, REQUEST, sleep=sleeps):
            pass
    assert provider.failures == 1
    assert sleeps.delays == []


async def test_closing_the_retrying_stream_closes_the_provider_stream() -> None:
    closed: list[bool] = []

    class Tracking(ScriptedProvider):
        async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
            try:
                async for event in super().stream(request):
                    yield event
            finally:
                closed.append(True)

    stream = stream_with_retry(Tracking(text="abcdefgh"), REQUEST)
    assert await anext(stream) == TextDelta("abcd")
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed == [True]


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, base_delay=0.5, max_delay=8.0, rng=rng) for n in range(10)]
    for attempt, delay in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 8.0


async def test_call_with_retry_retries_one_shot_calls() -> None:
    provider = scripted("scripted://?fail_before=timeout&fail_times=1&json=%7B%22a%22%3A1%7D")
    sleeps = Sleeps()
    result = await call_with_retry(
        lambda: provider.structured(REQUEST, name="x", schema={"type": "object"}), sleep=sleeps
    )
    assert result == {"a": 1}
    assert len(sleeps.delays) == 1


def test_retry_after_of_reads_milliseconds_seconds_and_dates() -> None:
    now = 1_445_412_470.0  # 2015-10-21 07:27:50 UTC
    assert retry_after_of({"retry-after": "20"}) == 20.0
    assert retry_after_of({"retry-after": "1.5"}) == 1.5
    # The milliseconds are more precise: they win.
    assert retry_after_of({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_of({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=now) == 10.0
    assert retry_after_of({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, now=now) == 0.0
    assert retry_after_of({"retry-after": "-3"}) == 0.0
    for unusable in ({}, {"retry-after": "soon"}, {"retry-after-ms": "nan"}):
        assert retry_after_of(unusable) is None


def test_x_should_retry_false_makes_any_error_final() -> None:
    assert not with_retry_advice(ProviderOverloaded(), {"x-should-retry": "false"}).retryable
    assert with_retry_advice(ProviderOverloaded(), {"x-should-retry": "true"}).retryable
    assert not with_retry_advice(ProviderRejected("no"), {"x-should-retry": "true"}).retryable


def test_retry_delay_waits_at_least_what_the_provider_asks_up_to_the_cap() -> None:
    def delay(retry_after: float | None, attempt: int = 0) -> float | None:
        error = ProviderRateLimited()
        error.retry_after = retry_after
        return retry_delay(error, attempt, attempts=3, base_delay=0.5, max_delay=8.0)

    assert delay(3.0) == 3.0
    assert delay(MAX_RETRY_AFTER) == MAX_RETRY_AFTER
    assert delay(MAX_RETRY_AFTER + 0.1) is None  # fail now, with the provider's code
    # Never sooner than the backoff: a "0" does not make clients retry in step.
    waited = delay(0.0, attempt=1)
    assert waited is not None and 0.5 <= waited <= 1.0
    assert delay(3.0, attempt=2) is None  # the last attempt failed
    assert retry_delay(ProviderPreempted(), 0, attempts=3, base_delay=0.5, max_delay=8.0) is None


async def test_a_preempted_background_stream_is_not_retried() -> None:
    """Its owner runs it again later: a retry now would only queue behind the
    reply that stopped it."""

    class Preempted(ScriptedProvider):
        async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
            self.failures += 1
            raise ProviderPreempted()
            yield  # pragma: no cover - makes this an async generator

    provider = Preempted()
    sleeps = Sleeps()
    with pytest.raises(ProviderPreempted):
        async for _ in stream_with_retry(provider, REQUEST, sleep=sleeps):
            pass
    assert provider.failures == 1
    assert sleeps.delays == []
