"""Fixtures for the provider tests: fake provider wires and providers on them.

The fake servers start once per session; each test gets them reset (no queued
replies, no recorded requests) through the function-scoped fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chathub.llm.anthropic import AnthropicProvider
from chathub.llm.openai import OpenAIProvider
from tests.fakewire.anthropic_server import AnthropicWire, serve_anthropic
from tests.fakewire.openai_server import OpenAIWire, serve_openai


@pytest.fixture(scope="session")
async def anthropic_server() -> AsyncIterator[AnthropicWire]:
    async with serve_anthropic() as wire:
        yield wire


@pytest.fixture
def anthropic_wire(anthropic_server: AnthropicWire) -> AnthropicWire:
    anthropic_server.reset()
    return anthropic_server


@pytest.fixture
async def anthropic_provider(anthropic_wire: AnthropicWire) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider(
        "claude-test", api_key="test-key", base_url=anthropic_wire.base_url, timeout=5.0
    )
    yield provider
    await provider.aclose()


@pytest.fixture(scope="session")
async def openai_server() -> AsyncIterator[OpenAIWire]:
    async with serve_openai() as wire:
        yield wire


@pytest.fixture
def openai_wire(openai_server: OpenAIWire) -> OpenAIWire:
    openai_server.reset()
    return openai_server


@pytest.fixture
async def openai_provider(openai_wire: OpenAIWire) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(
        "gpt-test", api_key="test-key", base_url=openai_wire.base_url, timeout=5.0
    )
    yield provider
    await provider.aclose()
