"""The scripted provider: deterministic chunks, pacing, usage and scripted failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from chathub.config import ConfigError
from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    ProviderConnection,
    ProviderError,
    ProviderOverloaded,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
)
from chathub.llm.factory import create_provider
from chathub.llm.scripted import ScriptedProvider


def ask(text: str = "hello", *, max_tokens: int = 1024, system: str = "") -> CompletionRequest:
    return CompletionRequest(turns=[ChatTurn("user", text)], max_tokens=max_tokens, system=system)


async def collect(provider: ScriptedProvider, request: CompletionRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


def scripted(url: str) -> ScriptedProvider:
    provider = create_provider(url)
    assert isinstance(provider, ScriptedProvider)
    return provider


async def test_default_reply_echoes_the_last_user_turn_in_four_char_chunks() -> None:
    request = CompletionRequest(
        turns=[
            ChatTurn("user", "first"),
            ChatTurn("assistant", "ok"),
            ChatTurn("user", "hello"),
        ]
    )
    events = await collect(scripted("scripted://"), request)
    assert events == [
        TextDelta("You "),
        TextDelta("said"),
        TextDelta(": he"),
        TextDelta("llo"),
        # input: ceil(5/4) + ceil(2/4) + ceil(5/4) = 5; output: ceil(15/4) = 4
        StreamEnd("end_turn", Usage(input_tokens=5, output_tokens=4)),
    ]


async def test_text_is_url_decoded_and_split_by_chunk() -> None:
    events = await collect(scripted("scripted://?text=Hello%2C+world&chunk=5"), ask())
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", ", wor", "ld"]
    assert events[-1] == StreamEnd("end_turn", Usage(input_tokens=2, output_tokens=3))


async def test_same_url_same_request_same_events() -> None:
    url = "scripted://?chunk=3"
    request = ask("deterministic?", system="be brief")
    assert await collect(scripted(url), request) == await collect(scripted(url), request)


async def test_max_tokens_cuts_the_reply_at_four_chars_per_token() -> None:
    events = await collect(
        scripted("scripted://?text=abcdefghijklmnopqrstuvwxyz"), ask(max_tokens=3)
    )
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "abcdefghijkl"
    assert events[-1] == StreamEnd("max_tokens", Usage(input_tokens=2, output_tokens=3))


async def test_empty_text_streams_no_delta_but_ends() -> None:
    events = await collect(scripted("scripted://?text="), ask())
    assert events == [StreamEnd("end_turn", Usage(input_tokens=2, output_tokens=0))]


async def test_rate_paces_the_chunks() -> None:
    provider = scripted("scripted://?text=abcde&chunk=1&rate=50")
    started = time.monotonic()
    events = await collect(provider, ask())
    elapsed = time.monotonic() - started
    assert len([e for e in events if isinstance(e, TextDelta)]) == 5
    # Chunk i is due i/50 s after the first: at least 4/50 s in all (a lower bound only).
    assert elapsed >= 0.075


async def turns_at_each_chunk(url: str) -> list[int]:
    """Stream ``url``'s reply beside another task that counts the event
    loop's turns; the count as each chunk arrives."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    seen = []
    try:
        async for event in scripted(url).stream(ask()):
            if isinstance(event, TextDelta):
                seen.append(ticks)
    finally:
        task.cancel()
    return seen


async def test_full_speed_still_yields_to_the_event_loop() -> None:
    seen = await turns_at_each_chunk("scripted://?chunk=1&text=" + "x" * 50)
    assert len(seen) == 50
    assert seen == sorted(set(seen))  # the other task ran before every chunk


async def test_burst_hands_over_that_many_chunks_per_turn_of_the_loop() -> None:
    seen = await turns_at_each_chunk("scripted://?chunk=1&burst=10&text=" + "x" * 45)
    runs = [seen[i : i + 10] for i in range(0, 45, 10)]
    assert [len(set(run)) for run in runs] == [1, 1, 1, 1, 1]  # no turn within a burst
    firsts = [run[0] for run in runs]
    assert firsts == sorted(set(firsts))  # the loop turned between bursts


@pytest.mark.parametrize(
    ("kind", "error", "retryable"),
    [
        ("overloaded", ProviderOverloaded, True),
        ("rate_limited", ProviderRateLimited, True),
        ("timeout", ProviderTimeout, True),
        ("connection", ProviderConnection, True),
        ("rejected", ProviderRejected, False),
    ],
)
async def test_fail_before_raises_before_any_delta(
    kind: str, error: type[ProviderError], retryable: bool
) -> None:
    provider = scripted(f"scripted://?fail_before={kind}")
    seen: list[StreamEvent] = []
    with pytest.raises(error) as raised:
        async for event in provider.stream(ask()):
            seen.append(event)
    assert seen == []
    assert raised.value.retryable is retryable


async def test_fail_times_limits_the_scripted_failures() -> None:
    provider = scripted("scripted://?fail_before=overloaded&fail_times=2&text=ok")
    for _ in range(2):
        with pytest.raises(ProviderOverloaded):
            await collect(provider, ask())
    assert (await collect(provider, ask()))[0] == TextDelta("ok")
    assert provider.failures == 2


async def test_fail_after_streams_n_chunks_then_raises_a_retryable_error() -> None:
    provider = scripted("scripted://?text=abcdefghijkl&fail_after=2")
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderOverloaded) as raised:
        async for event in provider.stream(ask()):
            seen.append(event)
    assert seen == [TextDelta("abcd"), TextDelta("efgh")]
    assert raised.value.retryable


async def test_fail_after_beyond_the_reply_fails_before_the_end() -> None:
    provider = scripted("scripted://?text=abc&fail_after=5")
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderOverloaded):
        async for event in provider.stream(ask()):
            seen.append(event)
    assert seen == [TextDelta("abc")]


async def test_closing_the_stream_early_stops_it() -> None:
    provider = scripted("scripted://?chunk=1&rate=1000&text=" + "y" * 1000)
    stream = provider.stream(ask())
    assert await anext(stream) == TextDelta("y")
    started = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 0.5


async def test_count_tokens_and_structured() -> None:
    provider = scripted("scripted://")
    assert await provider.count_tokens(ask("12345678", system="abcd")) == 3
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"enum": ["happy", "sad"]},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    assert await provider.structured(ask(), name="person", schema=schema) == {
        "name": "",
        "age": 0,
        "tags": [],
        "mood": "happy",
        "address": {"city": ""},
    }
    fixed = scripted("scripted://?json=%7B%22name%22%3A+%22Bob%22%7D")
    assert await fixed.structured(ask(), name="person", schema=schema) == {"name": "Bob"}


@pytest.mark.parametrize(
    "url",
    [
        "scripted://?txt=typo",
        "scripted://?chunk=0",
        "scripted://?chunk=two",
        "scripted://?rate=-1",
        "scripted://?burst=0",
        "scripted://?burst=many",
        "scripted://?fail_before=exploded",
        "scripted://?json=%5B1%5D",
    ],
)
def test_bad_parameters_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        create_provider(url)


async def test_ready_and_names() -> None:
    provider = scripted("scripted://")
    assert await provider.ready()
    assert (provider.name, provider.model) == ("scripted", "scripted")
    await provider.aclose()
