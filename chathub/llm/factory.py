"""Choosing the provider from ``CHATHUB_LLM``, by URL scheme.

=================================  ============================================
``local://`` (the default)         SmolLM2-135M-Instruct in-process (llama.cpp)
``local:///path/to/model.gguf``    another GGUF file, in-process
``anthropic://MODEL``              Anthropic Messages API (``ANTHROPIC_API_KEY``)
``openai://MODEL?base_url=...``    any OpenAI-compatible chat completions API
``scripted://?text=...``           deterministic replies for tests, benchmarks
=================================  ============================================

Each provider module documents its query parameters. Provider modules are
imported only when chosen, so a deployment on ``anthropic://`` needs neither
llama.cpp nor the model weights.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from chathub.config import ConfigError
from chathub.llm.base import LLMProvider

SCHEMES = ("local", "anthropic", "openai", "scripted")


def create_provider(url: str, *, n_ctx: int = 4096, setting: str = "CHATHUB_LLM") -> LLMProvider:
    """A new, unopened provider for ``url``; ``n_ctx`` is the context window of
    the local model and ignored by the others.

    Cheap: no network or model load happens here (the local model loads on first
    use). Raises :class:`ConfigError` for an unknown scheme or bad parameters,
    with a message that says what to change (in ``setting``).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "scripted":
        from chathub.llm.scripted import ScriptedProvider

        return ScriptedProvider.from_url(url)
    if scheme == "anthropic":
        from chathub.llm.anthropic import AnthropicProvider

        return AnthropicProvider.from_url(url)
    if scheme == "openai":
        from chathub.llm.openai import OpenAIProvider

        return OpenAIProvider.from_url(url)
    if scheme == "local":
        from chathub.llm.local import LocalProvider

        return LocalProvider.from_url(url, n_ctx=n_ctx)
    raise ConfigError(
        f"{setting}={url!r}: unknown provider scheme {scheme!r}; "
        f"supported: {', '.join(s + '://' for s in SCHEMES)}"
    )


def create_providers(
    default: str, named: Mapping[str, str]
) -> tuple[LLMProvider, dict[str, LLMProvider]]:
    """The default provider (``CHATHUB_LLM``) and the operator's named ones
    (``CHATHUB_LLM_PROVIDERS``), all made at startup, so that a bad URL or a
    missing key stops the server with a message naming the setting instead
    of failing every message of a mode that uses it."""
    providers = {}
    for name, url in named.items():
        setting = f"CHATHUB_LLM_PROVIDERS[{name!r}]"
        try:
            providers[name] = create_provider(url, setting=setting)
        except ConfigError as exc:
            if setting in str(exc):
                raise
            raise ConfigError(f"{setting}: {exc}") from exc
    return create_provider(default), providers


def url_params(url: str, allowed: Collection[str]) -> dict[str, str]:
    """The last value of each query parameter of ``url`` (URL-decoded; a blank
    value stays ``""``). A parameter not in ``allowed`` is a :class:`ConfigError`
    naming it, so a typo does not silently fall back to a default."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{parts.scheme}://: unknown parameter(s) {', '.join(unknown)}; "
            f"supported: {', '.join(sorted(allowed))}"
        )
    return {key: values[-1] for key, values in query.items()}


def url_model(url: str) -> str:
    """The model named by ``scheme://MODEL``: host and path, so names with a
    slash (``openai://meta-llama/Llama-3.1-8B``) or a colon (``llama3.2:1b``)
    survive."""
    parts = urlsplit(url)
    return unquote(parts.netloc + parts.path).strip("/")


def url_float(url: str, params: dict[str, str], key: str, default: float) -> float:
    """``params[key]`` as a float (``default`` when absent), or a ConfigError."""
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{urlsplit(url).scheme}://: {key}={raw!r} is not a number") from None


def url_flag(params: dict[str, str], key: str, default: bool) -> bool:
    """``params[key]`` as a boolean: ``0``, ``false``, ``no``, ``off`` are false."""
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    return raw.lower() not in ("0", "false", "no", "off")
