"""The OpenAI-compatible provider, through the real SDK, against a fake wire."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import REGISTRY

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
from chathub.llm.openai import OpenAIProvider
from chathub.llm.retry import call_with_retry, stream_with_retry
from tests.fakewire.openai_server import ChatReply, ErrorReply, OpenAIWire


def ask(text: str = "Hello there", *, max_tokens: int = 64) -> CompletionRequest:
    return CompletionRequest(turns=[ChatTurn("user", text)], max_tokens=max_tokens)


async def collect(
    provider: OpenAIProvider, request: CompletionRequest, seen: list[StreamEvent] | None = None
) -> list[StreamEvent]:
    events = [] if seen is None else seen
    async for event in provider.stream(request):
        events.append(event)
    return events


def provider_errors(code: str) -> float:
    """``chathub_provider_errors_total`` for ``code`` so far."""
    return REGISTRY.get_sample_value("chathub_provider_errors_total", {"code": code}) or 0.0


class Sleeps:
    """Records the delays a retry would wait, instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.mark.parametrize("usage_choices", ["empty", "null"])
async def test_streams_chunks_then_usage_then_done(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider, usage_choices: str
) -> None:
    openai_wire.enqueue(
        ChatReply(
            ["Hel", "lo", "!"],
            prompt_tokens=12,
            completion_tokens=3,
            usage_choices=usage_choices,  # type: ignore[arg-type]
        )
    )
    events = await collect(openai_provider, ask())
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta("!"),
        StreamEnd("end_turn", Usage(input_tokens=12, output_tokens=3)),
    ]


async def test_only_the_first_choice_content_is_text(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    """Another choice's deltas, a reasoning delta without ``content``, a
    null delta: none is a text delta, and none ends the stream early."""
    openai_wire.enqueue(
        ChatReply(
            ["Fine", "."],
            prompt_tokens=4,
            completion_tokens=2,
            extra_choices=[
                {"index": 1, "delta": {"content": "other"}, "finish_reason": None},
                {"index": 0, "delta": {"reasoning_content": "thinking"}, "finish_reason": None},
                {"index": 0, "delta": None, "finish_reason": None},
                {"index": 1, "delta": {}, "finish_reason": "stop"},
            ],
        )
    )
    events = await collect(openai_provider, ask())
    assert events == [
        TextDelta("Fine"),
        TextDelta("."),
        StreamEnd("end_turn", Usage(input_tokens=4, output_tokens=2)),
    ]


async def test_request_carries_model_messages_limits_and_usage_option(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    request = CompletionRequest(
        turns=[ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello!"), ChatTurn("user", "Bye")],
        system="Be kind.",
        temperature=0.3,
        max_tokens=50,
    )
    await collect(openai_provider, request)
    [received] = openai_wire.requests
    assert received.headers["authorization"] == "Bearer test-key"
    body = received.body
    assert body["model"] == "gpt-test"
    assert body["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert body["temperature"] == 0.3
    # A custom base_url means a compatible server: the widely understood field.
    assert body["max_tokens"] == 50
    assert "max_completion_tokens" not in body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_finish_reason_length_is_max_tokens(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ChatReply(["cut"], finish_reason="length"))
    events = await collect(openai_provider, ask())
    assert isinstance(events[-1], StreamEnd)
    assert events[-1].stop_reason == "max_tokens"


async def test_without_include_usage_the_option_is_not_sent_and_usage_is_estimated(
    openai_wire: OpenAIWire,
) -> None:
    provider = create_provider(f"openai://gpt-test?base_url={openai_wire.base_url}&include_usage=0")
    openai_wire.enqueue(ChatReply(["12345678", "9"]))
    try:
        events = [e async for e in provider.stream(ask("abcdefgh"))]
    finally:
        await provider.aclose()
    assert "stream_options" not in openai_wire.requests[0].body
    # One token per started four characters: 8 chars in, 9 chars out.
    assert events[-1] == StreamEnd("end_turn", Usage(input_tokens=2, output_tokens=3))


@pytest.mark.parametrize(
    ("error_type", "code", "error"),
    [
        ("server_error", None, ProviderOverloaded),
        ("rate_limit_exceeded", "rate_limit_exceeded", ProviderRateLimited),
        ("invalid_request_error", None, ProviderRejected),
    ],
)
async def test_mid_stream_error_object_after_deltas(
    openai_wire: OpenAIWire,
    openai_provider: OpenAIProvider,
    error_type: str,
    code: str | None,
    error: type[ProviderError],
) -> None:
    openai_wire.enqueue(ChatReply(["Par", "tial"], error=error_type, error_code=code))
    seen: list[StreamEvent] = []
    with pytest.raises(error):
        await collect(openai_provider, ask(), seen)
    assert seen == [TextDelta("Par"), TextDelta("tial")]


@pytest.mark.parametrize(
    ("reply", "error", "retryable"),
    [
        (ErrorReply(429, code="rate_limit_exceeded"), ProviderRateLimited, True),
        (
            ErrorReply(429, error_type="insufficient_quota", code="insufficient_quota"),
            ProviderRejected,
            False,
        ),
        (ErrorReply(500), ProviderOverloaded, True),
        (ErrorReply(503), ProviderOverloaded, True),
        (ErrorReply(408), ProviderTimeout, True),
        (ErrorReply(400), ProviderRejected, False),
        (ErrorReply(401, code="invalid_api_key"), ProviderRejected, False),
        (ErrorReply(404, code="model_not_found"), ProviderRejected, False),
    ],
)
async def test_http_errors_before_the_stream(
    openai_wire: OpenAIWire,
    openai_provider: OpenAIProvider,
    reply: ErrorReply,
    error: type[ProviderError],
    retryable: bool,
) -> None:
    openai_wire.enqueue(reply)
    seen: list[StreamEvent] = []
    with pytest.raises(error) as raised:
        await collect(openai_provider, ask(), seen)
    assert seen == []
    assert raised.value.retryable is retryable
    assert len(openai_wire.requests) == 1  # the SDK's own retries are off


async def test_a_garbled_chunk_is_a_connection_error(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    """A ``data:`` line that is not JSON (a stream garbled on the way) is our
    retryable ``connection`` error, not a bare ``JSONDecodeError``."""
    openai_wire.enqueue(ChatReply(["never"], raw_data=["{not json"]))
    with pytest.raises(ProviderConnection, match="not valid JSON") as raised:
        await collect(openai_provider, ask())
    assert raised.value.retryable


async def test_a_garbled_chunk_before_the_first_token_is_retried_and_counted(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ChatReply(["never"], raw_data=["{not json"]), ChatReply(["ok"]))
    counted = provider_errors("connection")
    sleeps = Sleeps()
    events = [e async for e in stream_with_retry(openai_provider, ask(), sleep=sleeps)]
    assert events[0] == TextDelta("ok")
    assert len(openai_wire.requests) == 2
    assert len(sleeps.delays) == 1
    assert provider_errors("connection") == counted + 1


async def test_a_failure_after_a_usage_chunk_keeps_its_counts(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    """A server that sends usage with every chunk has counted the prompt
    and the tokens so far: a failing reply reports those, not estimates."""
    openai_wire.enqueue(
        ChatReply(["Par", "tial"], prompt_tokens=40, error="server_error", usage_every_chunk=True)
    )
    with pytest.raises(ProviderOverloaded) as raised:
        await collect(openai_provider, ask())
    assert (raised.value.input_tokens, raised.value.output_tokens) == (40, 2)


async def test_a_failure_before_any_usage_chunk_has_no_counts(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ChatReply(["Par"], error="server_error"))
    with pytest.raises(ProviderOverloaded) as raised:
        await collect(openai_provider, ask())
    assert (raised.value.input_tokens, raised.value.output_tokens) == (None, None)


async def test_an_empty_reply_counts_zero_output_tokens(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ChatReply([], prompt_tokens=7, completion_tokens=0))
    events = await collect(openai_provider, ask())
    assert events == [StreamEnd("end_turn", Usage(input_tokens=7, output_tokens=0))]


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"retry-after": "4"}, 4.0),
        (503, {"retry-after": "3"}, 3.0),
        (429, {"retry-after-ms": "2500", "retry-after": "3"}, 2.5),
    ],
)
async def test_retry_after_is_waited_before_the_next_attempt(
    openai_wire: OpenAIWire,
    openai_provider: OpenAIProvider,
    status: int,
    headers: dict[str, str],
    wait: float,
) -> None:
    openai_wire.enqueue(ErrorReply(status, headers=headers), ChatReply(["ok"]))
    sleeps = Sleeps()
    events = [e async for e in stream_with_retry(openai_provider, ask(), sleep=sleeps)]
    assert events[0] == TextDelta("ok")
    assert len(sleeps.delays) == 1
    assert wait <= sleeps.delays[0] <= max(wait, 0.5)


@pytest.mark.parametrize(
    ("status", "error"), [(429, ProviderRateLimited), (503, ProviderOverloaded)]
)
async def test_a_retry_after_beyond_the_cap_fails_at_once(
    openai_wire: OpenAIWire,
    openai_provider: OpenAIProvider,
    status: int,
    error: type[ProviderError],
) -> None:
    openai_wire.enqueue(ErrorReply(status, headers={"retry-after": "20"}), ChatReply(["early"]))
    sleeps = Sleeps()
    with pytest.raises(error) as raised:
        async for _ in stream_with_retry(openai_provider, ask(), sleep=sleeps):
            pass
    assert raised.value.retry_after == 20.0
    assert sleeps.delays == []
    assert len(openai_wire.requests) == 1


async def test_x_should_retry_false_is_not_retried(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(
        ErrorReply(500, headers={"x-should-retry": "false"}), ChatReply(["not sent"])
    )
    sleeps = Sleeps()
    with pytest.raises(ProviderOverloaded) as raised:
        async for _ in stream_with_retry(openai_provider, ask(), sleep=sleeps):
            pass
    assert not raised.value.retryable
    assert sleeps.delays == []
    assert len(openai_wire.requests) == 1


async def test_call_with_retry_honours_retry_after_too(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    """One-shot calls (a reasoning step's ``structured``) wait the same way."""
    openai_wire.enqueue(
        ErrorReply(429, headers={"retry-after": "3"}),
        ChatReply(['{"name": "Bob", "age": 3}']),
        ErrorReply(429, headers={"retry-after": "60"}),
        ChatReply(['{"name": "never", "age": 0}']),
    )
    sleeps = Sleeps()

    async def person() -> dict[str, object]:
        return await openai_provider.structured(ask(), name="person", schema=PERSON)

    assert await call_with_retry(person, sleep=sleeps) == {"name": "Bob", "age": 3}
    assert len(sleeps.delays) == 1 and 3.0 <= sleeps.delays[0] <= 3.5
    with pytest.raises(ProviderRateLimited):
        await call_with_retry(person, sleep=sleeps)
    assert len(sleeps.delays) == 1
    assert len(openai_wire.requests) == 3


async def test_stream_with_retry_succeeds_after_one_429(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ErrorReply(429), ChatReply(["ok"]))
    delays: list[float] = []

    async def no_wait(delay: float) -> None:
        delays.append(delay)

    events = [e async for e in stream_with_retry(openai_provider, ask(), sleep=no_wait)]
    assert events[0] == TextDelta("ok")
    assert len(openai_wire.requests) == 2
    assert len(delays) == 1


async def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIProvider("gpt-test", api_key="k", base_url=f"http://127.0.0.1:{port}/v1")
    try:
        with pytest.raises(ProviderConnection):
            await collect(provider, ask())
        assert not await provider.ready()
    finally:
        await provider.aclose()


async def test_a_silent_server_is_a_timeout(openai_wire: OpenAIWire) -> None:
    """A stream that stalls past the read timeout is a timeout, not a
    connection failure (both pass through the same transport error)."""
    provider = OpenAIProvider("gpt-test", api_key="k", base_url=openai_wire.base_url, timeout=0.3)
    openai_wire.enqueue(ChatReply(["late"], delay_s=3.0))
    try:
        with pytest.raises(ProviderTimeout):
            await collect(provider, ask())
    finally:
        await provider.aclose()


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


async def test_structured_uses_a_json_schema_response_format(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider
) -> None:
    openai_wire.enqueue(ChatReply(['{"name": ', '"Bob", "age": 3}']))
    result = await openai_provider.structured(ask("Bob is 3."), name="person", schema=PERSON)
    assert result == {"name": "Bob", "age": 3}
    body = openai_wire.requests[0].body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON},
    }
    assert not body.get("stream")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (ChatReply(['{"name": "Bo']), "not valid JSON"),
        (ChatReply(['"just a string"']), "expected a JSON object"),
        (ChatReply(['{"name": "Bo'], finish_reason="length"), "max_tokens"),
    ],
)
async def test_structured_bad_output_is_rejected(
    openai_wire: OpenAIWire, openai_provider: OpenAIProvider, reply: ChatReply, match: str
) -> None:
    openai_wire.enqueue(reply)
    with pytest.raises(ProviderRejected, match=match):
        await openai_provider.structured(ask(), name="person", schema=PERSON)


async def test_a_local_server_needs_no_key(
    openai_wire: OpenAIWire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    provider = create_provider(f"openai://llama3.2:1b?base_url={openai_wire.base_url}")
    assert isinstance(provider, OpenAIProvider)
    try:
        assert provider.model == "llama3.2:1b"
        assert await provider.ready()
        await collect(provider, ask())
    finally:
        await provider.aclose()
    completion = next(r for r in openai_wire.requests if r.path.endswith("/chat/completions"))
    assert completion.headers["authorization"] == "Bearer unused"
    assert completion.body["model"] == "llama3.2:1b"


async def test_max_tokens_field_can_be_chosen(openai_wire: OpenAIWire) -> None:
    provider = create_provider(
        f"openai://gpt-test?base_url={openai_wire.base_url}&max_tokens_field=max_completion_tokens"
    )
    try:
        await collect(provider, ask(max_tokens=33))  # type: ignore[arg-type]
    finally:
        await provider.aclose()
    body = openai_wire.requests[0].body
    assert body["max_completion_tokens"] == 33
    assert "max_tokens" not in body


def test_the_public_api_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        create_provider("openai://gpt-4o-mini")
