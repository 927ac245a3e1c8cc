"""Anthropic's Messages API, streamed, through the official ``anthropic`` SDK.

``anthropic://MODEL`` with optional query parameters:

``base_url``
    Another endpoint (a proxy, a test server). Without it the SDK reads
    ``ANTHROPIC_BASE_URL``, then uses the public API.
``timeout``
    Seconds for connecting and between streamed reads (default 60).
``send_temperature``
    ``0`` leaves ``temperature`` out of requests. Recent SDKs dropped the
    argument and recent models reject non-default values, so it is sent
    through ``extra_body``; turn it off for models that refuse it.

The key comes from ``ANTHROPIC_API_KEY`` (or the SDK's other credential
sources). The SDK's own retries are off (``max_retries=0``): retries happen in
:mod:`chathub.llm.retry`, only before the first token.

Cost per streamed token: the SDK's default HTTP client and its typed event
models each cost a token more CPU than all the rest of the reply's way to
the socket. So the SDK sends through its aiohttp transport
(``DefaultAioHttpClient``) and hands over each event as the JSON object the
API sent (figures: docs/benchmarks.md).

SDK errors are mapped at this boundary (:func:`provider_error`). The error
body's ``type`` decides first, because a failure in the middle of a stream
arrives as ``event: error`` on the 200 response and the SDK raises a plain
``APIStatusError`` (status 200) for it; the HTTP status decides otherwise:

    rate_limit_error, 429 (RateLimitError)               -> ProviderRateLimited
    overloaded_error, api_error, 529 (OverloadedError),
      other 5xx (InternalServerError), 409               -> ProviderOverloaded
    timeout_error, 408, APITimeoutError                  -> ProviderTimeout
    APIConnectionError, transport errors, a stream
      that ends before its message does, an event
      that is not JSON (a garbled stream)                -> ProviderConnection
    invalid_request_error, authentication_error,
      permission_error, not_found_error, ..., other 4xx  -> ProviderRejected

An HTTP error keeps what its headers say about trying again
(:func:`~chathub.llm.base.with_retry_advice`: ``retry-after-ms``,
``retry-after``, ``x-should-retry``). A stream that fails after
``message_start`` keeps the input tokens it reported there
(:attr:`~chathub.llm.base.ProviderError.input_tokens`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import anthropic
import httpx2
from anthropic.types import AssistantMessageParam, MessageParam, UserMessageParam

from chathub.config import ConfigError
from chathub.llm.base import (
    CompletionRequest,
    ProviderConnection,
    ProviderError,
    ProviderOverloaded,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    StopReason,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    parse_json_object,
    with_retry_advice,
)
from chathub.llm.factory import url_flag, url_float, url_model, url_params

STOP_REASONS: dict[str, StopReason] = {
    "end_turn": "end_turn",
    "stop_sequence": "end_turn",
    "tool_use": "end_turn",
    "pause_turn": "end_turn",
    "max_tokens": "max_tokens",
    "model_context_window_exceeded": "max_tokens",
    "refusal": "blocked",
}
"""Anthropic's stop reasons in ours; an unknown one counts as ``end_turn``."""

_PARAMS = {"base_url", "timeout", "send_temperature"}
_FAILURES = (anthropic.AnthropicError, httpx2.HTTPError, json.JSONDecodeError)
"""What a call through the SDK can raise for a fault of the API or the way to
it (an event the SDK cannot decode is a ``JSONDecodeError``)."""
_ERRORS_BY_TYPE: dict[str, Callable[[str], ProviderError]] = {
    "rate_limit_error": ProviderRateLimited,
    "overloaded_error": ProviderOverloaded,
    "api_error": ProviderOverloaded,
    "timeout_error": ProviderTimeout,
    "invalid_request_error": ProviderRejected,
    "authentication_error": ProviderRejected,
    "billing_error": ProviderRejected,
    "permission_error": ProviderRejected,
    "not_found_error": ProviderRejected,
    "request_too_large": ProviderRejected,
}
"""The API's error types (the ``error.type`` of an error body or event)."""


class AnthropicProvider:
    """Claude through the Messages API. One SDK client (one connection pool) per
    provider; :meth:`aclose` closes it."""

    name = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        send_temperature: bool = True,
    ) -> None:
        if not model:
            raise ConfigError(
                "anthropic:// needs a model name, e.g. CHATHUB_LLM=anthropic://claude-sonnet-4-5"
            )
        self.model = model
        self.send_temperature = send_temperature
        try:
            self._client = anthropic.AsyncAnthropic(
                api_key=api_key,
                base_url=base_url,
                timeout=timeout,
                max_retries=0,
                http_client=anthropic.DefaultAioHttpClient(),
            )
        except anthropic.AnthropicError as exc:  # a broken credentials profile, say
            raise ConfigError(f"anthropic:// cannot load credentials: {exc}") from exc
        if (
            self._client.api_key is None
            and self._client.auth_token is None
            and self._client.credentials is None
        ):
            raise ConfigError(
                "anthropic:// needs credentials: set ANTHROPIC_API_KEY (or pass api_key)"
            )

    @classmethod
    def from_url(cls, url: str) -> AnthropicProvider:
        params = url_params(url, _PARAMS)
        return cls(
            url_model(url),
            base_url=params.get("base_url") or None,
            timeout=url_float(url, params, "timeout", 60.0),
            send_temperature=url_flag(params, "send_temperature", True),
        )

    def _arguments(self, request: CompletionRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": request.model or self.model,
            "max_tokens": request.max_tokens,
            "messages": _messages(request),
        }
        if request.system:
            arguments["system"] = request.system
        if self.send_temperature:
            arguments["extra_body"] = {"temperature": request.temperature}
        return arguments

    @contextlib.asynccontextmanager
    async def _events(
        self, request: CompletionRequest, **extra: Any
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The stream's events as the JSON objects the API sends. The SDK
        still makes the request, decodes the server-sent events and raises
        its errors (an ``event: error`` too); only the typed event models are
        skipped, which cost more CPU per token than everything else here."""
        async with self._client.messages.with_streaming_response.create(
            **self._arguments(request), **extra, stream=True
        ) as response:
            events = await response.parse(to=anthropic.AsyncStream[object])
            yield cast(AsyncIterator[dict[str, Any]], events)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        """Text deltas as they arrive, then the stop reason and usage: input
        tokens (including cache reads and writes) from ``message_start``,
        cumulative output tokens from the last ``message_delta``. A stream that
        ends without a stop reason raises :class:`ProviderConnection`; an
        error after ``message_start`` carries its input tokens."""
        input_tokens: int | None = None  # the API's count, once message_start came
        output_tokens = 0
        stop_reason: StopReason | None = None
        try:
            async with self._events(request) as events:
                async for event in events:
                    if not isinstance(event, dict):  # not an event object: ignored
                        continue
                    kind = event.get("type")
                    if kind == "content_block_delta":
                        delta = event.get("delta") or {}
                        if delta.get("type") == "text_delta" and (text := delta.get("text")):
                            yield TextDelta(text)
                    elif kind == "message_start":
                        usage = (event.get("message") or {}).get("usage") or {}
                        input_tokens = _total_input(usage)
                        output_tokens = usage.get("output_tokens") or 0
                    elif kind == "message_delta":
                        usage = event.get("usage") or {}
                        # 0 is a count (an empty reply), not a missing one.
                        if usage.get("output_tokens") is not None:
                            output_tokens = usage["output_tokens"]
                        if usage.get("input_tokens") is not None:
                            input_tokens = _total_input(usage)
                        reason = (event.get("delta") or {}).get("stop_reason")
                        if reason is not None:
                            stop_reason = STOP_REASONS.get(reason, "end_turn")
        except _FAILURES as exc:
            raise _with_input(provider_error(exc), input_tokens) from exc
        if stop_reason is None:
            raise _with_input(
                ProviderConnection("anthropic: the stream ended before the message did"),
                input_tokens,
            )
        yield StreamEnd(stop_reason, Usage(input_tokens or 0, output_tokens))

    async def count_tokens(self, request: CompletionRequest) -> int:
        """Input tokens of ``request`` as the API counts them (``count_tokens``
        endpoint: free, no generation)."""
        arguments = self._arguments(request)
        arguments.pop("max_tokens")
        arguments.pop("extra_body", None)
        try:
            counted = await self._client.messages.count_tokens(**arguments)
        except _FAILURES as exc:
            raise provider_error(exc) from exc
        return counted.input_tokens

    async def structured(
        self, request: CompletionRequest, *, name: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """The input of a tool named ``name`` with input schema ``schema``, which
        the model is forced to call (``tool_choice`` of type ``tool``). The tool
        input streams as ``input_json_delta`` pieces; their concatenation is
        parsed here. Raises :class:`ProviderRejected` when the model does not
        call the tool, stops at ``max_tokens`` mid-object, or sends invalid JSON.
        """
        tool = {
            "name": name,
            "description": f"Record the {name} for this conversation.",
            "input_schema": schema,
        }
        tool_index: int | None = None
        pieces: list[str] = []
        stop_reason: str | None = None
        try:
            async with self._events(
                request, tools=[tool], tool_choice={"type": "tool", "name": name}
            ) as events:
                async for event in events:
                    if not isinstance(event, dict):  # not an event object: ignored
                        continue
                    kind = event.get("type")
                    if kind == "content_block_start":
                        block = event.get("content_block") or {}
                        if block.get("type") == "tool_use" and block.get("name") == name:
                            tool_index = event.get("index")
                    elif kind == "content_block_delta":
                        delta = event.get("delta") or {}
                        if (
                            tool_index is not None
                            and event.get("index") == tool_index
                            and delta.get("type") == "input_json_delta"
                        ):
                            pieces.append(delta.get("partial_json") or "")
                    elif kind == "message_delta":
                        stop_reason = (event.get("delta") or {}).get("stop_reason") or stop_reason
        except _FAILURES as exc:
            raise provider_error(exc) from exc
        if tool_index is None:
            raise ProviderRejected(f"anthropic: the model did not call the tool {name!r}")
        if stop_reason == "max_tokens":
            raise ProviderRejected(
                f"anthropic: the {name!r} object was cut at max_tokens={request.max_tokens}"
            )
        return parse_json_object("".join(pieces) or "{}", source=f"anthropic tool {name!r}")

    async def ready(self) -> bool:
        """True when the API answers for this model (``GET /v1/models/{model}``:
        no tokens spent); False on any error, including an unknown model."""
        try:
            await self._client.models.retrieve(self.model, timeout=5.0)
        except _FAILURES:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()


def provider_error(exc: BaseException) -> ProviderError:
    """Our error for an ``anthropic`` SDK (or transport) exception."""
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ProviderTimeout(f"anthropic: {exc}")
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return ProviderConnection(f"anthropic: {exc}")
    if isinstance(exc, json.JSONDecodeError):
        # Bytes that are not what the API sends: a stream garbled or cut on
        # the way (a proxy, say). The request was fine; sending it again is.
        return ProviderConnection(f"anthropic: the response is not valid JSON ({exc})")
    if isinstance(exc, anthropic.APIStatusError):
        return with_retry_advice(_status_error(exc), exc.response.headers)
    # Bad response shape, missing credentials (TypeError from the SDK), and the like.
    return ProviderRejected(f"anthropic: {exc}")


def _status_error(exc: anthropic.APIStatusError) -> ProviderError:
    status, kind = exc.status_code, exc.type
    message = f"anthropic {status} {kind or 'error'}: {exc.api_message or exc}"
    # The body's type decides first: it is all a mid-stream `event: error` has.
    by_type = _ERRORS_BY_TYPE.get(kind or "")
    if by_type is not None:
        return by_type(message)
    if status == 429:
        return ProviderRateLimited(message)
    if status == 408:
        return ProviderTimeout(message)
    if status >= 500 or status == 409 or status < 400:
        # 5xx and lock conflicts pass; so may an unknown error event on a 200
        # stream: the server failed after accepting the request.
        return ProviderOverloaded(message)
    return ProviderRejected(message)


def _with_input(error: ProviderError, input_tokens: int | None) -> ProviderError:
    """``error`` carrying the API's input count, if ``message_start`` brought one."""
    error.input_tokens = input_tokens
    return error


def _messages(request: CompletionRequest) -> list[MessageParam]:
    # The API rejects empty text blocks; an empty turn (say, a reply cancelled
    # before its first token) carries nothing, so it is left out.
    return [
        UserMessageParam(role="user", content=turn.content)
        if turn.role == "user"
        else AssistantMessageParam(role="assistant", content=turn.content)
        for turn in request.turns
        if turn.content
    ]


def _total_input(usage: dict[str, Any]) -> int:
    """Input tokens, cache writes and reads included (each may be null)."""
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
    )
