"""Whole chat turns over a socket with the production providers: chathub
served by uvicorn, streaming from the real Anthropic or OpenAI SDK (through
its aiohttp transport) against the fake API of each, as a deployment does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.fakewire import anthropic_server, openai_server
from tests.harness import RunningServer, make_team, start_server, test_settings
from tests.wsclient import WsClient, reply_end

PROVIDERS = ["anthropic", "openai"]


@asynccontextmanager
async def wire_of(provider: str) -> AsyncIterator[tuple[Any, str]]:
    """The fake API and the ``CHATHUB_LLM`` URL that points at it."""
    if provider == "anthropic":
        async with anthropic_server.serve_anthropic() as wire:
            yield wire, f"anthropic://claude-test?base_url={quote(wire.base_url, safe='')}"
    else:
        async with openai_server.serve_openai() as wire:
            yield wire, f"openai://gpt-test?base_url={quote(wire.base_url, safe='')}"


def text_reply(provider: str, chunks: list[str], **kwargs: Any) -> Any:
    if provider == "anthropic":
        return anthropic_server.TextReply(chunks, **kwargs)
    return openai_server.ChatReply(chunks, **kwargs)


def error_reply(provider: str, status: int) -> Any:
    if provider == "anthropic":
        return anthropic_server.ErrorReply(status)
    return openai_server.ErrorReply(status)


@pytest.fixture(params=PROVIDERS)
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, RunningServer, Any]]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    provider: str = request.param
    async with wire_of(provider) as (wire, llm):
        server = await start_server(
            test_settings(
                f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
                tmp_path,
                llm=llm,
                coalesce_ms=0,
                extraction_debounce_s=3600,
            )
        )
        try:
            yield provider, server, wire
        finally:
            await server.stop()


async def joined(server: RunningServer) -> tuple[str, WsClient]:
    """A new team's new session, and a socket of its owner joined to it."""
    team = await make_team(server.state)
    async with httpx.AsyncClient(base_url=server.url) as client:
        created = await client.post("/chat/sessions", json={}, headers=team.owner.headers)
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    ws = await WsClient.connect(server.ws_url, team.owner.api_key)
    await ws.request({"type": "join", "session_id": session_id})
    return session_id, ws


async def send(ws: WsClient, session_id: str, client_msg_id: str, content: str) -> str:
    """``message.send``; the reply's id."""
    sent = await ws.request(
        {
            "type": "message.send",
            "session_id": session_id,
            "client_msg_id": client_msg_id,
            "content": content,
        }
    )
    assert sent["type"] == "ack", sent
    return str(sent["reply_id"])


async def turn(server: RunningServer, content: str) -> tuple[str, list[dict[str, Any]]]:
    """One message over a socket; the reply's frames up to its end."""
    session_id, ws = await joined(server)
    try:
        reply_id = await send(ws, session_id, "m1", content)
        await ws.first(reply_end(reply_id))
    finally:
        await ws.close()
    # every frame read, those read while waiting for the ack too
    return reply_id, [f for f in ws.seen if f.get("reply_id") == reply_id]


def deltas(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "reply.delta")


async def test_a_reply_streams_and_is_stored_with_the_api_usage(
    served: tuple[str, RunningServer, Any],
) -> None:
    provider, server, wire = served
    chunks = ["The ", "answer ", "is ", "forty", "-two", "."]
    wire.enqueue(
        text_reply(
            provider,
            chunks,
            **{"output_tokens" if provider == "anthropic" else "completion_tokens": 7},
        )
    )
    _, frames = await turn(server, "What is the answer?")
    end = frames[-1]
    assert end["type"] == "reply.completed", end
    assert deltas(frames) == "".join(chunks) == end["message"]["content"]
    assert end["stop_reason"] == "end_turn"
    assert end["usage"]["output_tokens"] == 7
    assert end["usage"]["input_tokens"] == (11 if provider == "anthropic" else 9)


async def test_an_overloaded_api_is_retried_before_the_first_token(
    served: tuple[str, RunningServer, Any],
) -> None:
    provider, server, wire = served
    wire.enqueue(error_reply(provider, 529 if provider == "anthropic" else 503))
    wire.enqueue(text_reply(provider, ["Second ", "try."]))
    _, frames = await turn(server, "Hello?")
    assert frames[-1]["type"] == "reply.completed", frames[-1]
    assert deltas(frames) == "Second try."
    posts = [r for r in wire.requests if r.method == "POST" and "count_tokens" not in r.path]
    assert len(posts) == 2


async def test_a_provider_asking_to_wait_long_fails_the_reply_with_its_wait(
    served: tuple[str, RunningServer, Any],
) -> None:
    """A ``Retry-After`` beyond what the server waits itself fails the reply
    at once, and the ending tells clients how long the provider asked for."""
    provider, server, wire = served
    for _ in range(2):  # once more, should a retry be (wrongly) made
        if provider == "anthropic":
            wire.enqueue(anthropic_server.ErrorReply(429, headers={"retry-after": "20"}))
        else:
            wire.enqueue(openai_server.ErrorReply(429, headers={"retry-after": "20"}))
    _, frames = await turn(server, "Hello?")
    end = frames[-1]
    assert end["type"] == "reply.failed", end
    assert end["code"] == "rate_limited" and end["retryable"] is True
    assert end["retry_after_s"] == 20


async def test_a_failure_without_a_wait_names_none(
    served: tuple[str, RunningServer, Any],
) -> None:
    provider, server, wire = served
    wire.enqueue(error_reply(provider, 400))
    _, frames = await turn(server, "Hello?")
    end = frames[-1]
    assert end["type"] == "reply.failed", end
    assert end["code"] == "provider_rejected" and "retry_after_s" not in end


async def test_a_failure_mid_stream_ends_the_reply_with_its_partial_text(
    served: tuple[str, RunningServer, Any],
) -> None:
    provider, server, wire = served
    error = "overloaded_error" if provider == "anthropic" else "server_error"
    wire.enqueue(text_reply(provider, ["Half ", "an ", "answer. ", "And mo"], error=error))
    _, frames = await turn(server, "Tell me everything.")
    end = frames[-1]
    assert end["type"] == "reply.failed", end
    assert end["code"] == "overloaded" and end["retryable"] is True
    # "mo", held by the output guardrail (a word in progress), is dropped
    assert deltas(frames) == "Half an answer. And " == end["partial"]["content"]
    # Not retried: the user has seen tokens of this attempt.
    posts = [r for r in wire.requests if r.method == "POST" and "count_tokens" not in r.path]
    assert len(posts) == 1


async def test_a_failure_mid_stream_stores_the_counts_the_api_sent(
    served: tuple[str, RunningServer, Any],
) -> None:
    """Counts the provider sent before failing are kept, the others are
    estimated: Anthropic's ``message_start`` carries the input's (the output
    is estimated); a server that puts usage in every chunk (vLLM) has sent
    both."""
    provider, server, wire = served
    if provider == "anthropic":
        wire.enqueue(
            anthropic_server.TextReply(
                ["Half ", "an ", "answer"], error="api_error", input_tokens=321
            )
        )
        expected = {"input_tokens": 321, "output_tokens": 4, "estimated": True}
    else:
        wire.enqueue(
            openai_server.ChatReply(
                ["Half ", "an ", "answer"],
                prompt_tokens=321,
                error="server_error",
                usage_every_chunk=True,
            )
        )
        expected = {"input_tokens": 321, "output_tokens": 3}
    _, frames = await turn(server, "Tell me everything.")
    end = frames[-1]
    assert end["type"] == "reply.failed", end
    assert end["partial"]["usage"] == expected


async def test_a_cancelled_stream_keeps_its_text_and_the_next_turn_streams(
    served: tuple[str, RunningServer, Any],
) -> None:
    """Cancelling closes the provider's response mid-body; the SDK's
    connection pool serves the next reply as if nothing happened."""
    provider, server, wire = served
    wire.enqueue(text_reply(provider, [f"w{i} " for i in range(200)], delay_s=0.02))
    wire.enqueue(text_reply(provider, ["Next ", "one."]))
    session_id, ws = await joined(server)
    try:
        reply_id = await send(ws, session_id, "a", "Go")
        await ws.first(lambda f: f["type"] == "reply.delta")
        cancelled = await ws.request({"type": "reply.cancel", "reply_id": reply_id})
        assert cancelled["type"] == "ack" and cancelled["cancelling"] is True
        end = await ws.first(reply_end(reply_id))
        assert end["type"] == "reply.completed" and end["stop_reason"] == "cancelled", end
        # every frame read so far, those read while waiting for the ack too
        text = deltas([f for f in ws.seen if f.get("reply_id") == reply_id])
        assert text == end["message"]["content"]
        assert text.startswith("w0 ") and len(text) < len("".join(f"w{i} " for i in range(200)))

        next_id = await send(ws, session_id, "b", "Again")
        assert (await ws.first(reply_end(next_id)))["type"] == "reply.completed"
        assert deltas([f for f in ws.seen if f.get("reply_id") == next_id]) == "Next one."
    finally:
        await ws.close()
