"""The Anthropic provider, through the real SDK, against a fake Messages API wire."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from chathub.llm.anthropic import AnthropicProvider
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
from chathub.llm.retry import MAX_RETRY_AFTER, stream_with_retry
from tests.fakewire import RecordedRequest
from tests.fakewire.anthropic_server import AnthropicWire, ErrorReply, TextReply, ToolUseReply


def ask(text: str = "Hello there", *, max_tokens: int = 64) -> CompletionRequest:
    return CompletionRequest(turns=[ChatTurn("user", text)], max_tokens=max_tokens)


async def collect(
    provider: AnthropicProvider, request: CompletionRequest, seen: list[StreamEvent] | None = None
) -> list[StreamEvent]:
    events = [] if seen is None else seen
    async for event in provider.stream(request):
        events.append(event)
    return events


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def api_key_of(received: RecordedRequest) -> str | None:
    # Older SDKs send `x-api-key`; 2.x sends the key as a bearer token.
    bearer = received.headers.get("authorization", "").removeprefix("Bearer ")
    return received.headers.get("x-api-key") or bearer or None


def provider_errors(code: str) -> float:
    """``chathub_provider_errors_total`` for ``code`` so far."""
    return REGISTRY.get_sample_value("chathub_provider_errors_total", {"code": code}) or 0.0


class Sleeps:
    """Records the delays :func:`stream_with_retry` would wait, instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("ping", [True, False])
async def test_streams_text_usage_and_stop_reason(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider, ping: bool
) -> None:
    anthropic_wire.enqueue(
        TextReply(["Hel", "lo", " world"], input_tokens=11, output_tokens=6, ping=ping)
    )
    events = await collect(anthropic_provider, ask())
    # A ping is not a delta: exactly one event per text chunk, then the end.
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(" world"),
        StreamEnd("end_turn", Usage(input_tokens=11, output_tokens=6)),
    ]


async def test_input_tokens_count_cache_writes_and_reads(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(
        TextReply(
            ["Hi"],
            input_tokens=5,
            cache_creation_input_tokens=100,
            cache_read_input_tokens=2000,
            output_tokens=1,
        )
    )
    events = await collect(anthropic_provider, ask())
    assert events[-1] == StreamEnd("end_turn", Usage(input_tokens=2105, output_tokens=1))


async def test_other_blocks_and_unknown_events_are_not_text(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    """A thinking block, an event type this code does not know, and a data
    line that is not an event object pass without a delta or a failure."""

    def event(data: object) -> tuple[str, str]:
        name = data["type"] if isinstance(data, dict) else "content_block_delta"
        return name, json.dumps(data)

    thinking = {"type": "thinking_delta", "thinking": "Let me see."}
    anthropic_wire.enqueue(
        TextReply(
            ["Yes", "."],
            extra_events=[
                event(
                    {
                        "type": "content_block_start",
                        "index": 1,
                        "content_block": {"type": "thinking"},
                    }
                ),
                event({"type": "content_block_delta", "index": 1, "delta": thinking}),
                event(
                    {
                        "type": "content_block_delta",
                        "index": 1,
                        "delta": {"type": "signature_delta"},
                    }
                ),
                event({"type": "content_block_stop", "index": 1}),
                event({"type": "message_annotation", "note": "new in some later API"}),
                event(["not", "an", "object"]),
            ],
        )
    )
    events = await collect(anthropic_provider, ask())
    assert events == [
        TextDelta("Yes"),
        TextDelta("."),
        StreamEnd("end_turn", Usage(input_tokens=11, output_tokens=2)),
    ]


async def test_an_empty_reply_counts_zero_output_tokens(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    """The final ``message_delta`` says 0: that is the count, not a missing
    one to fill in from ``message_start`` (which says 1)."""
    anthropic_wire.enqueue(TextReply([], input_tokens=11, output_tokens=0))
    events = await collect(anthropic_provider, ask())
    assert events == [StreamEnd("end_turn", Usage(input_tokens=11, output_tokens=0))]


@pytest.mark.parametrize(
    "reply",
    [
        TextReply(["Par", "tial"], error="overloaded_error", input_tokens=30),
        TextReply(["Half"], truncate=True, input_tokens=30),
    ],
    ids=["error-event", "cut-short"],
)
async def test_a_failure_after_message_start_keeps_its_input_tokens(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider, reply: TextReply
) -> None:
    """``message_start`` carried the API's input count (cache reads
    included): a reply failing later reports it, not an estimate. Its output
    count never came (the final one is in ``message_delta``)."""
    anthropic_wire.enqueue(replace(reply, cache_read_input_tokens=1000))
    with pytest.raises(ProviderError) as raised:
        await collect(anthropic_provider, ask())
    assert raised.value.input_tokens == 1030
    assert raised.value.output_tokens is None


async def test_an_error_before_the_stream_has_no_counts(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(ErrorReply(529))
    with pytest.raises(ProviderOverloaded) as raised:
        await collect(anthropic_provider, ask())
    assert (raised.value.input_tokens, raised.value.output_tokens) == (None, None)


async def test_a_garbled_event_is_a_connection_error(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    """An event whose data is not JSON (a stream garbled on the way) is our
    retryable ``connection`` error, not a bare ``JSONDecodeError``."""
    anthropic_wire.enqueue(
        TextReply(["never"], extra_events=[("content_block_delta", "{not json")])
    )
    with pytest.raises(ProviderConnection, match="not valid JSON") as raised:
        await collect(anthropic_provider, ask())
    assert raised.value.retryable
    assert raised.value.input_tokens == 11  # message_start came before it


async def test_a_garbled_event_before_the_first_token_is_retried_and_counted(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(
        TextReply(["never"], extra_events=[("content_block_delta", "{not json")]),
        TextReply(["second", " time"]),
    )
    counted = provider_errors("connection")
    sleeps = Sleeps()
    events = [e async for e in stream_with_retry(anthropic_provider, ask(), sleep=sleeps)]
    assert text_of(events) == "second time"
    assert len(anthropic_wire.message_requests) == 2
    assert len(sleeps.delays) == 1
    assert provider_errors("connection") == counted + 1


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"retry-after": "4"}, 4.0),
        (529, {"retry-after": "3"}, 3.0),
        (429, {"retry-after-ms": "2500", "retry-after": "3"}, 2.5),
    ],
)
async def test_retry_after_is_waited_before_the_next_attempt(
    anthropic_wire: AnthropicWire,
    anthropic_provider: AnthropicProvider,
    status: int,
    headers: dict[str, str],
    wait: float,
) -> None:
    anthropic_wire.enqueue(ErrorReply(status, headers=headers), TextReply(["ok"]))
    sleeps = Sleeps()
    events = [e async for e in stream_with_retry(anthropic_provider, ask(), sleep=sleeps)]
    assert text_of(events) == "ok"
    # At least what the API asked (more only where the backoff says more).
    assert len(sleeps.delays) == 1
    assert wait <= sleeps.delays[0] <= max(wait, 0.5)


@pytest.mark.parametrize(
    ("status", "error"), [(429, ProviderRateLimited), (529, ProviderOverloaded)]
)
async def test_a_retry_after_beyond_the_cap_fails_at_once(
    anthropic_wire: AnthropicWire,
    anthropic_provider: AnthropicProvider,
    status: int,
    error: type[ProviderError],
) -> None:
    """Asked to wait 20 s, more than a reply should wait for its first token:
    no retry (it would come too early and be refused again), the provider's
    own code at once."""
    assert MAX_RETRY_AFTER < 20
    anthropic_wire.enqueue(
        ErrorReply(status, headers={"retry-after": "20"}), TextReply(["too early"])
    )
    sleeps = Sleeps()
    with pytest.raises(error) as raised:
        async for _ in stream_with_retry(anthropic_provider, ask(), sleep=sleeps):
            pass
    assert raised.value.retry_after == 20.0
    assert raised.value.retryable
    assert sleeps.delays == []
    assert len(anthropic_wire.message_requests) == 1


async def test_x_should_retry_false_is_not_retried(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(
        ErrorReply(529, headers={"x-should-retry": "false"}), TextReply(["not sent"])
    )
    sleeps = Sleeps()
    with pytest.raises(ProviderOverloaded) as raised:
        async for _ in stream_with_retry(anthropic_provider, ask(), sleep=sleeps):
            pass
    assert not raised.value.retryable
    assert sleeps.delays == []
    assert len(anthropic_wire.message_requests) == 1


async def test_request_carries_model_system_limits_temperature_and_turns(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        turns=[
            ChatTurn("user", "What is 2+2?"),
            ChatTurn("assistant", "4."),
            ChatTurn("user", "And 3+3?"),
        ],
        system="You are terse.",
        temperature=0.2,
        max_tokens=77,
    )
    await collect(anthropic_provider, request)
    [received] = anthropic_wire.message_requests
    assert api_key_of(received) == "test-key"
    assert received.body["model"] == "claude-test"
    assert received.body["system"] == "You are terse."
    assert received.body["max_tokens"] == 77
    assert received.body["temperature"] == 0.2
    assert received.body["stream"] is True
    assert received.body["messages"] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]


async def test_request_model_overrides_and_empty_turns_are_dropped(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        turns=[ChatTurn("user", "a"), ChatTurn("assistant", ""), ChatTurn("user", "b")],
        model="claude-other",
    )
    await collect(anthropic_provider, request)
    body = anthropic_wire.message_requests[0].body
    assert body["model"] == "claude-other"
    assert "system" not in body
    assert body["messages"] == [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("max_tokens", "max_tokens"),
        ("stop_sequence", "end_turn"),
        ("refusal", "blocked"),
        ("model_context_window_exceeded", "max_tokens"),
    ],
)
async def test_stop_reasons(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider, theirs: str, ours: str
) -> None:
    anthropic_wire.enqueue(TextReply(["cut"], stop_reason=theirs, output_tokens=64))
    events = await collect(anthropic_provider, ask())
    assert events[-1] == StreamEnd(ours, Usage(11, 64))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error_type", "error"),
    [
        ("overloaded_error", ProviderOverloaded),
        ("rate_limit_error", ProviderRateLimited),
        ("api_error", ProviderOverloaded),
        ("invalid_request_error", ProviderRejected),
    ],
)
async def test_mid_stream_error_event_after_deltas(
    anthropic_wire: AnthropicWire,
    anthropic_provider: AnthropicProvider,
    error_type: str,
    error: type[ProviderError],
) -> None:
    anthropic_wire.enqueue(TextReply(["Par", "tial"], error=error_type))
    seen: list[StreamEvent] = []
    with pytest.raises(error) as raised:
        await collect(anthropic_provider, ask(), seen)
    assert seen == [TextDelta("Par"), TextDelta("tial")]
    assert error_type in raised.value.message


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (429, ProviderRateLimited, True),
        (529, ProviderOverloaded, True),
        (500, ProviderOverloaded, True),
        (503, ProviderOverloaded, True),
        (504, ProviderTimeout, True),
        (400, ProviderRejected, False),
        (401, ProviderRejected, False),
        (403, ProviderRejected, False),
        (404, ProviderRejected, False),
        (413, ProviderRejected, False),
    ],
)
async def test_http_errors_before_the_stream(
    anthropic_wire: AnthropicWire,
    anthropic_provider: AnthropicProvider,
    status: int,
    error: type[ProviderError],
    retryable: bool,
) -> None:
    anthropic_wire.enqueue(ErrorReply(status, message="nope"))
    seen: list[StreamEvent] = []
    with pytest.raises(error) as raised:
        await collect(anthropic_provider, ask(), seen)
    assert seen == []
    assert raised.value.retryable is retryable
    # The SDK's own retries are off: one request, whatever the status.
    assert len(anthropic_wire.message_requests) == 1


async def test_a_stream_cut_before_the_message_ends_is_a_connection_error(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(TextReply(["Half"], truncate=True))
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderConnection):
        await collect(anthropic_provider, ask(), seen)
    assert seen == [TextDelta("Half")]


async def test_unreachable_server_is_a_connection_error() -> None:
    provider = AnthropicProvider(
        "claude-test", api_key="k", base_url=f"http://127.0.0.1:{closed_port()}"
    )
    try:
        with pytest.raises(ProviderConnection) as raised:
            await collect(provider, ask())
        assert raised.value.retryable
        assert not await provider.ready()
    finally:
        await provider.aclose()


async def test_a_silent_server_is_a_timeout(anthropic_wire: AnthropicWire) -> None:
    provider = AnthropicProvider(
        "claude-test", api_key="k", base_url=anthropic_wire.base_url, timeout=0.3
    )
    anthropic_wire.enqueue(TextReply(["late"], delay_s=3.0))
    try:
        with pytest.raises(ProviderTimeout):
            await collect(provider, ask())
    finally:
        await provider.aclose()


async def test_stream_with_retry_succeeds_after_one_529(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(ErrorReply(529), TextReply(["second", " time"]))
    delays: list[float] = []

    async def no_wait(delay: float) -> None:
        delays.append(delay)

    events = [e async for e in stream_with_retry(anthropic_provider, ask(), sleep=no_wait)]
    assert text_of(events) == "second time"
    assert isinstance(events[-1], StreamEnd)
    assert len(anthropic_wire.message_requests) == 2
    assert len(delays) == 1


async def test_stream_with_retry_does_not_retry_a_mid_stream_error(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(TextReply(["Par"], error="overloaded_error"), TextReply(["never"]))

    async def no_wait(delay: float) -> None:
        raise AssertionError("no retry expected")

    seen: list[StreamEvent] = []
    with pytest.raises(ProviderOverloaded):
        async for event in stream_with_retry(anthropic_provider, ask(), sleep=no_wait):
            seen.append(event)
    assert seen == [TextDelta("Par")]
    assert len(anthropic_wire.message_requests) == 1


async def test_closing_the_stream_early_returns_promptly(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(TextReply(["a", "b", "c", "d"], delay_s=1.0))
    stream = anthropic_provider.stream(ask())
    started = time.monotonic()

    async def first() -> StreamEvent:
        return await anext(stream)

    consumer = asyncio.create_task(first())
    await asyncio.sleep(0.1)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await stream.aclose()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 0.9


async def test_count_tokens(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.token_count = 42
    request = CompletionRequest(turns=[ChatTurn("user", "count me")], system="sys")
    assert await anthropic_provider.count_tokens(request) == 42
    [received] = anthropic_wire.requests
    assert received.path == "/v1/messages/count_tokens"
    assert received.body["system"] == "sys"
    assert received.body["messages"] == [{"role": "user", "content": "count me"}]
    assert "max_tokens" not in received.body


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


async def test_structured_forces_the_tool_and_joins_input_json_deltas(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(ToolUseReply("person", ['{"name": "Bo', 'b", "ag', 'e": 3}']))
    result = await anthropic_provider.structured(ask("Bob is 3."), name="person", schema=PERSON)
    assert result == {"name": "Bob", "age": 3}
    body = anthropic_wire.message_requests[0].body
    assert body["tool_choice"] == {"type": "tool", "name": "person"}
    assert [tool["name"] for tool in body["tools"]] == ["person"]
    assert body["tools"][0]["input_schema"] == PERSON


async def test_structured_without_a_tool_call_is_rejected(
    anthropic_wire: AnthropicWire, anthropic_provider: AnthropicProvider
) -> None:
    anthropic_wire.enqueue(TextReply(["I'd rather chat."]))
    with pytest.raises(ProviderRejected, match="did not call"):
        await anthropic_provider.structured(ask(), name="person", schema=PERSON)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (ToolUseReply("person", ['{"name": "Bo']), "not valid JSON"),
        (ToolUseReply("person", ["[1, 2]"]), "expected a JSON object"),
        (ToolUseReply("person", ['{"name": "Bo'], stop_reason="max_tokens"), "max_tokens"),
    ],
)
async def test_structured_bad_tool_input_is_rejected(
    anthropic_wire: AnthropicWire,
    anthropic_provider: AnthropicProvider,
    reply: ToolUseReply,
    match: str,
) -> None:
    anthropic_wire.enqueue(reply)
    with pytest.raises(ProviderRejected, match=match):
        await anthropic_provider.structured(ask(), name="person", schema=PERSON)


async def test_factory_url_with_base_url_and_no_temperature(
    anthropic_wire: AnthropicWire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    provider = create_provider(
        f"anthropic://claude-haiku-test?base_url={anthropic_wire.base_url}&send_temperature=0"
    )
    assert isinstance(provider, AnthropicProvider)
    try:
        assert provider.model == "claude-haiku-test"
        assert await provider.ready()
        await collect(provider, ask())
    finally:
        await provider.aclose()
    received = anthropic_wire.message_requests[0]
    assert api_key_of(received) == "env-key"
    assert "temperature" not in received.body
