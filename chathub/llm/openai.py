"""OpenAI-compatible chat completions, streamed, through the official ``openai`` SDK.

``openai://MODEL`` with optional query parameters:

``base_url``
    Another OpenAI-compatible server: Ollama ``http://localhost:11434/v1/``,
    vLLM ``http://localhost:8000/v1``, Gemini
    ``https://generativelanguage.googleapis.com/v1beta/openai/``. Without it the
    SDK reads ``OPENAI_BASE_URL``, then uses the public API.
``include_usage``
    ``0`` stops asking for the final usage chunk
    (``stream_options={"include_usage": true}``), for servers that reject it;
    usage is then estimated (:func:`~chathub.llm.base.estimate_tokens`).
``max_tokens_field``
    ``max_completion_tokens`` (the default for the public API, which deprecated
    the other) or ``max_tokens`` (the default with a ``base_url``: what
    compatible servers understand).
``timeout``
    Seconds for connecting and between streamed reads (default 60).

The key comes from ``OPENAI_API_KEY``. A local server needs none: with a base
URL (query or ``OPENAI_BASE_URL``) and no key, the placeholder ``unused`` is
sent. The SDK's own retries are off (``max_retries=0``); see
:mod:`chathub.llm.retry`.

Cost per streamed token: the SDK's default HTTP client and its typed event
models each cost a token more CPU than all the rest of the reply's way to
the socket. So the SDK sends through its aiohttp transport
(``DefaultAioHttpClient``) and hands over each event as the JSON object the
API sent (figures: docs/benchmarks.md).

SDK errors are mapped at this boundary (:func:`provider_error`):

    RateLimitError (429)                            -> ProviderRateLimited
      ... but code insufficient_quota (no credit)   -> ProviderRejected
    InternalServerError (5xx), 409                  -> ProviderOverloaded
    APITimeoutError, 408                            -> ProviderTimeout
    APIConnectionError, a stream cut short, a
      chunk that is not JSON (a garbled stream)     -> ProviderConnection
    other 4xx                                       -> ProviderRejected
    an ``{"error": ...}`` object mid-stream         -> by its type/code: rate
      limit -> ProviderRateLimited, invalid_request_error -> ProviderRejected,
      anything else -> ProviderOverloaded

An HTTP error keeps what its headers say about trying again
(:func:`~chathub.llm.base.with_retry_advice`: ``retry-after-ms``,
``retry-after``, ``x-should-retry``). A stream that fails after a usage
chunk (servers that send usage with every chunk) keeps its counts
(:attr:`~chathub.llm.base.ProviderError.input_tokens`, ``output_tokens``).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import httpx2
import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema
from openai.types.shared_params.response_format_json_schema import JSONSchema

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
    estimate_request_tokens,
    estimate_tokens,
    parse_json_object,
    with_retry_advice,
)
from chathub.llm.factory import url_flag, url_float, url_model, url_params

MaxTokensField = Literal["max_tokens", "max_completion_tokens"]

FINISH_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "tool_calls": "end_turn",
    "function_call": "end_turn",
    "length": "max_tokens",
    "content_filter": "blocked",
}
"""OpenAI's finish reasons in ours; an unknown one counts as ``end_turn``."""

_PARAMS = {"base_url", "include_usage", "max_tokens_field", "timeout"}
_FAILURES = (openai.OpenAIError, httpx2.HTTPError, json.JSONDecodeError)
"""What a call through the SDK can raise for a fault of the server or the way
to it (a chunk the SDK cannot decode is a ``JSONDecodeError``)."""


class OpenAIProvider:
    """A chat model behind an OpenAI-compatible API. One SDK client (one
    connection pool) per provider; :meth:`aclose` closes it."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        include_usage: bool = True,
        max_tokens_field: MaxTokensField | None = None,
        timeout: float = 60.0,
    ) -> None:
        if not model:
            raise ConfigError(
                "openai:// needs a model name, e.g. CHATHUB_LLM=openai://gpt-4o-mini or "
                "openai://llama3.2?base_url=http://localhost:11434/v1/"
            )
        custom_server = bool(base_url or os.environ.get("OPENAI_BASE_URL"))
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not custom_server:
                raise ConfigError(
                    "openai:// needs OPENAI_API_KEY, or a base_url for a server without keys"
                )
            api_key = "unused"  # local servers ignore it; the SDK insists on one
        self.model = model
        self.include_usage = include_usage
        self.max_tokens_field: MaxTokensField = max_tokens_field or (
            "max_tokens" if custom_server else "max_completion_tokens"
        )
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url or None,
            timeout=timeout,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        )

    @classmethod
    def from_url(cls, url: str) -> OpenAIProvider:
        params = url_params(url, _PARAMS)
        field = params.get("max_tokens_field") or None
        if field not in (None, "max_tokens", "max_completion_tokens"):
            raise ConfigError(
                f"openai://: max_tokens_field={field!r}: use max_tokens or max_completion_tokens"
            )
        return cls(
            url_model(url),
            base_url=params.get("base_url") or None,
            include_usage=url_flag(params, "include_usage", True),
            max_tokens_field=field,  # type: ignore[arg-type]  # checked just above
            timeout=url_float(url, params, "timeout", 60.0),
        )

    def _limit(self, request: CompletionRequest, field: MaxTokensField) -> int | openai.Omit:
        return request.max_tokens if field == self.max_tokens_field else openai.omit

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        """Content deltas of the first choice as they arrive, then the stop
        reason and usage (from the last usage chunk: the final one, whose
        ``choices`` is ``[]`` or ``null``; estimated when the server sends
        none). A stream that ends without a finish reason raises
        :class:`ProviderConnection`; an error carries the counts of the
        last usage chunk, if one came."""
        usage: Usage | None = None
        stop_reason: StopReason | None = None
        streamed: list[str] = []
        try:
            async with self._client.chat.completions.with_streaming_response.create(
                model=request.model or self.model,
                messages=_messages(request),
                temperature=request.temperature,
                stream=True,
                stream_options={"include_usage": True} if self.include_usage else openai.omit,
                max_tokens=self._limit(request, "max_tokens"),
                max_completion_tokens=self._limit(request, "max_completion_tokens"),
            ) as response:
                # The chunks as the JSON objects the server sends: the SDK
                # still decodes the server-sent events and raises its errors
                # (an `{"error": ...}` chunk too), but its typed chunk models
                # cost several times more CPU per token than all the rest.
                chunks = cast(
                    AsyncIterator[dict[str, Any]],
                    await response.parse(to=openai.AsyncStream[object]),
                )
                async for chunk in chunks:
                    if not isinstance(chunk, dict):  # not a chunk object: ignored
                        continue
                    if counts := chunk.get("usage"):
                        usage = Usage(
                            counts.get("prompt_tokens") or 0, counts.get("completion_tokens") or 0
                        )
                    # vLLM sends `"choices": null` on the usage chunk, OpenAI `[]`.
                    for choice in chunk.get("choices") or ():
                        if choice.get("index", 0) != 0:
                            continue
                        delta = choice.get("delta")
                        content = delta.get("content") if delta else None
                        if content:
                            streamed.append(content)
                            yield TextDelta(content)
                        if (reason := choice.get("finish_reason")) is not None:
                            stop_reason = FINISH_REASONS.get(reason, "end_turn")
        except _FAILURES as exc:
            raise _with_usage(provider_error(exc), usage) from exc
        if stop_reason is None:
            raise _with_usage(
                ProviderConnection("openai: the stream ended without a finish_reason"), usage
            )
        if usage is None:
            usage = Usage(estimate_request_tokens(request), estimate_tokens("".join(streamed)))
        yield StreamEnd(stop_reason, usage)

    async def count_tokens(self, request: CompletionRequest) -> int:
        """An estimate (:func:`~chathub.llm.base.estimate_request_tokens`): the
        chat completions API has no counting endpoint, and a compatible server's
        tokenizer is unknown here."""
        return estimate_request_tokens(request)

    async def structured(
        self, request: CompletionRequest, *, name: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """The object the model returns under ``response_format`` of type
        ``json_schema`` (named ``name``, not ``strict``, so any schema is
        accepted). Raises :class:`ProviderRejected` on a refusal, a reply cut at
        ``max_tokens``, or content that is not a JSON object."""
        try:
            completion = await self._client.chat.completions.create(
                model=request.model or self.model,
                messages=_messages(request),
                temperature=request.temperature,
                response_format=ResponseFormatJSONSchema(
                    type="json_schema", json_schema=JSONSchema(name=name, schema=schema)
                ),
                max_tokens=self._limit(request, "max_tokens"),
                max_completion_tokens=self._limit(request, "max_completion_tokens"),
            )
        except _FAILURES as exc:
            raise provider_error(exc) from exc
        if not completion.choices:
            raise ProviderRejected(f"openai: no choices in the {name!r} reply")
        choice = completion.choices[0]
        if choice.message.refusal:
            raise ProviderRejected(f"openai: the model refused {name!r}: {choice.message.refusal}")
        if choice.finish_reason == "length":
            raise ProviderRejected(
                f"openai: the {name!r} object was cut at max_tokens={request.max_tokens}"
            )
        return parse_json_object(choice.message.content or "", source=f"openai {name!r}")

    async def ready(self) -> bool:
        """True when the server lists its models (``GET /models``: no tokens
        spent); False on any error."""
        try:
            await self._client.models.list(timeout=5.0)
        except _FAILURES:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()


def provider_error(exc: BaseException) -> ProviderError:
    """Our error for an ``openai`` SDK (or transport) exception."""
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        if _refused(exc):
            return ProviderConnection(f"openai: {exc}")
        return ProviderTimeout(f"openai: {exc}")
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return ProviderConnection(f"openai: {exc}")
    if isinstance(exc, json.JSONDecodeError):
        # Bytes that are not what the server sends: a stream garbled or cut
        # on the way (a proxy, say). The request was fine; sending it again is.
        return ProviderConnection(f"openai: the response is not valid JSON ({exc})")
    if isinstance(exc, openai.APIStatusError):
        return with_retry_advice(_status_error(exc), exc.response.headers)
    if isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIResponseValidationError):
        # An `{"error": ...}` object in the middle of a 200 stream.
        kind = f"{exc.type or ''} {exc.code or ''}".strip()
        message = f"openai stream error {kind or 'unknown'}: {exc.message}"
        if "rate_limit" in kind:
            return ProviderRateLimited(message)
        if "invalid_request" in kind:
            return ProviderRejected(message)
        if "timeout" in kind:
            return ProviderTimeout(message)
        return ProviderOverloaded(message)
    return ProviderRejected(f"openai: {exc}")


def _status_error(exc: openai.APIStatusError) -> ProviderError:
    status = exc.status_code
    message = f"openai {status} {exc.code or exc.type or 'error'}: {exc.message}"
    if status == 429:
        # No credit left is a 429 too, but waiting will not fix it.
        if exc.code == "insufficient_quota":
            return ProviderRejected(message)
        return ProviderRateLimited(message)
    if status == 408:
        return ProviderTimeout(message)
    if status >= 500 or status == 409:
        return ProviderOverloaded(message)
    return ProviderRejected(message)


def _with_usage(error: ProviderError, usage: Usage | None) -> ProviderError:
    """``error`` carrying the server's counts, when a usage chunk came."""
    if usage is not None:
        error.input_tokens = usage.input_tokens
        error.output_tokens = usage.output_tokens
    return error


def _refused(exc: BaseException) -> bool:
    """Whether a "timeout" was a failure to connect: the SDK's aiohttp
    transport reports every aiohttp connection error, a refused connection
    included, as ``httpx2.ConnectTimeout``. The error it wraps tells: an
    ``OSError`` that is not a timeout (aiohttp's connector errors are
    ``OSError`` as well)."""
    seen = exc.__cause__ or exc.__context__
    for _ in range(8):  # the chain is short; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _messages(request: CompletionRequest) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if request.system:
        messages.append(ChatCompletionSystemMessageParam(role="system", content=request.system))
    for turn in request.turns:
        if turn.role == "user":
            messages.append(ChatCompletionUserMessageParam(role="user", content=turn.content))
        else:
            messages.append(
                ChatCompletionAssistantMessageParam(role="assistant", content=turn.content)
            )
    return messages
