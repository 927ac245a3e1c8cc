"""Choosing a provider from CHATHUB_LLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from chathub.config import ConfigError
from chathub.llm.anthropic import AnthropicProvider
from chathub.llm.base import LLMProvider, StructuredOutput, TokenCounter
from chathub.llm.factory import create_provider, url_model
from chathub.llm.openai import OpenAIProvider
from chathub.llm.scripted import ScriptedProvider


async def test_schemes_choose_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    providers: list[LLMProvider] = [
        create_provider("scripted://"),
        create_provider("anthropic://claude-test"),
        create_provider("openai://gpt-test"),
    ]
    try:
        assert [type(p) for p in providers] == [ScriptedProvider, AnthropicProvider, OpenAIProvider]
        assert [p.name for p in providers] == ["scripted", "anthropic", "openai"]
        assert [p.model for p in providers] == ["scripted", "claude-test", "gpt-test"]
        for provider in providers:
            assert isinstance(provider, TokenCounter)
            assert isinstance(provider, StructuredOutput)
    finally:
        for provider in providers:
            await provider.aclose()


def test_unknown_scheme_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as raised:
        create_provider("gemini://flash")
    for scheme in ("local://", "anthropic://", "openai://", "scripted://"):
        assert scheme in str(raised.value)


@pytest.mark.parametrize("url", ["anthropic://", "openai://?base_url=http://127.0.0.1:1/v1"])
def test_a_model_is_required(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    with pytest.raises(ConfigError, match="model"):
        create_provider(url)


@pytest.fixture
def no_anthropic_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CONFIG_DIR",
        "ANTHROPIC_IDENTITY_TOKEN",
        "ANTHROPIC_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no profiles on disk either
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    return tmp_path


def test_anthropic_without_credentials_says_which_variable(no_anthropic_credentials: Path) -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        create_provider("anthropic://claude-test")


def test_anthropic_with_a_broken_profile_is_a_config_error(
    no_anthropic_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(no_anthropic_credentials / "missing"))
    with pytest.raises(ConfigError, match="credentials"):
        create_provider("anthropic://claude-test")


@pytest.mark.parametrize(
    "url",
    [
        "anthropic://claude-test?base=typo",
        "anthropic://claude-test?timeout=soon",
        "openai://gpt-test?max_tokens_field=limit",
    ],
)
def test_bad_parameters(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with pytest.raises(ConfigError):
        create_provider(url)


@pytest.mark.parametrize(
    ("url", "model"),
    [
        ("anthropic://claude-sonnet-4-5", "claude-sonnet-4-5"),
        (
            "openai://meta-llama/Llama-3.1-8B-Instruct?base_url=x",
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
        ("openai://llama3.2:1b", "llama3.2:1b"),
        ("openai://Qwen%2FQwen2.5-7B", "Qwen/Qwen2.5-7B"),
    ],
)
def test_model_names_survive_the_url(url: str, model: str) -> None:
    assert url_model(url) == model
