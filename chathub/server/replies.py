"""Replies: from a user's message to a stored, streamed answer.

``send`` stores the user message (idempotent on ``client_msg_id``) and starts
one reply task per session. The task streams the provider's tokens through the
coalescer into the session log as ``reply.delta`` events and ends with exactly
one ``reply.completed`` or ``reply.failed``. The text stored for a reply is
always the concatenation of its deltas, whatever ends it: the provider,
``cancel``, an error or shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub import logs
from chathub.auth import Principal
from chathub.config import Settings
from chathub.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    TooLarge,
    Unavailable,
)
from chathub.ids import new_id
from chathub.llm.base import (
    CompletionRequest,
    LLMProvider,
    ProviderError,
    StreamEnd,
    StreamEvent,
    StructuredOutput,
    TextDelta,
    Usage,
    estimate_tokens,
    estimate_tokens_of,
)
from chathub.llm.context import (
    FILE_EXCERPT_CHARS,
    FileExcerpt,
    HistoryItem,
    build_prompt,
    provider_counter,
    provider_window,
)
from chathub.llm.guardrails import check_input, detect, redact_all
from chathub.llm.modes import Mode, mode_policy
from chathub.llm.retry import call_with_retry, stream_with_retry
from chathub.server import metrics, ratelimit
from chathub.server.bus import Bus
from chathub.server.extraction import Extractor
from chathub.server.leases import MemoryReplyLeases, ReplyLeases
from chathub.server.ratelimit import MemoryRateLimiter, RateLimiter
from chathub.server.reply_stream import DeltaWriter
from chathub.server.session_feed import SessionFeed
from chathub.server.session_log import LogUnavailable, SessionLog, StaleReply
from chathub.server.summarizer import HISTORY_LIMIT, SessionSummarizer
from chathub.storage.blobs import BlobStore
from chathub.storage.db import backend_unreachable, transaction, while_unreachable
from chathub.storage.models import File as FileRow
from chathub.storage.models import Message, utcnow
from chathub.storage.repositories import files as files_repo
from chathub.storage.repositories import modes as modes_repo
from chathub.storage.repositories import sessions as repo
from chathub.storage.repositories import summaries
from chathub.wire import message_view, stored_file_ids

log = logging.getLogger("chathub.replies")

CANCEL_CHANNEL = "reply.cancel"
EARLY_CANCELS_KEPT = 1000
"""Cancels of replies not (yet) running here that are remembered."""
ENDING_PATIENCE_S = 30.0
"""How long a reply's end waits for an unreachable database."""


@dataclass(frozen=True)
class SendResult:
    message: dict[str, Any]
    reply_id: str | None
    duplicate: bool
    seq: int | None = None


@dataclass
class Charge:
    """What the rate limits took for one message: its estimated tokens, and
    each bucket's cost (key, cost, limit), to give back if it is not sent."""

    tokens: int
    taken: list[tuple[str, float, int]] = field(default_factory=list)


@dataclass
class ReplyRun:
    """A reply being generated on this instance."""

    reply_id: str
    session_id: str
    team_id: str
    user_message_id: str
    mode: Mode
    model: str
    provider: LLMProvider
    history: list[HistoryItem]
    summary: str | None
    files: list[FileExcerpt]
    """Excerpts of the attached text files, newest first, already through
    the input guardrail."""
    member_id: str
    """Who sent the message: the rate limits charge them the reply's tokens."""
    charged_tokens: int
    """Tokens the rate limits took when the message was sent."""
    writer: DeltaWriter | None = None
    end: StreamEnd | None = None
    """The provider's end of stream, with its usage (None: it never came)."""
    input_tokens: int = 0
    """The prompt's size as counted when it was built."""
    streamed_chars: int = 0
    """Characters the provider streamed (before the guardrail)."""
    cancelled: bool = False
    stream_task: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first_token_at: float | None = None
    dropped: int = 0
    lost: bool = False
    ending: bool = False
    """Generation is over and the reply is being stored and announced."""
    released: bool = False
    last_seq: int = 0
    """The seq of the last event this reply appended outside its writer."""
    trace: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)


class Replies:
    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        session_log: SessionLog,
        bus: Bus,
        provider: LLMProvider,
        extractor: Extractor | None = None,
        blobs: BlobStore | None = None,
        limiter: RateLimiter | None = None,
        leases: ReplyLeases | None = None,
        named_providers: dict[str, LLMProvider] | None = None,
        session_feed: SessionFeed | None = None,
    ) -> None:
        self.settings = settings
        self.session_feed = session_feed
        self.leases: ReplyLeases = leases or MemoryReplyLeases()
        self.instance_id = new_id()
        self.limiter: RateLimiter = limiter or MemoryRateLimiter()
        self.blobs = blobs
        self.extractor = extractor
        self.sessionmaker = sessionmaker
        self.log = session_log
        self.bus = bus
        self.provider = provider
        self._named = named_providers or {}
        # Replies whose cancel arrived before they were started here.
        self._early_cancels: OrderedDict[str, None] = OrderedDict()
        self.runs: dict[str, ReplyRun] = {}
        self._by_session: dict[str, ReplyRun] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unsubscribe = bus.subscribe(CANCEL_CHANNEL, self._on_cancel_message)
        self._closing = False
        self.window = provider_window(provider)
        self.count = provider_counter(provider)
        self.summarizer = SessionSummarizer(
            sessionmaker=sessionmaker, provider=provider, count=self.count, window=self.window
        )

    # -- sending -----------------------------------------------------------

    async def floor_from_store(self, session_id: str, stored_last_seq: int) -> None:
        """Before a socket or a request follows the session: make its log go
        on above ``stored_last_seq`` (the session's last seq in the database)
        where the log lost its count (a restart, a Redis that lost its data),
        so that no seq is handed out twice and a resume from before the loss
        gets ``recovered: false``.

        A reply that is ending stores the seq of its ending event a moment
        before it appends it: while a reply holds the session, the database
        may be one ahead of a log that lost nothing, and the log is left
        alone (that reply's turn floored it when it began). Once the lease
        is free, every seq the database holds was appended."""
        if not await self.leases.held(session_id):
            await self.log.ensure_floor(session_id, stored_last_seq)

    async def send(
        self,
        principal: Principal,
        *,
        session_id: str,
        client_msg_id: str,
        content: str,
        mode: str | None = None,
        file_ids: list[str] | None = None,
    ) -> SendResult:
        """Store the message and start its reply. A retry with the same
        ``client_msg_id`` returns the first result and starts nothing."""
        if self._closing:
            raise Unavailable("server is shutting down")
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                return await self._send_locked(
                    principal, session_id, client_msg_id, content, mode, file_ids
                )
        finally:
            # No one holds or awaits it (also when this call was cancelled
            # while waiting): forget the lock.
            if not lock.locked() and not lock._waiters and self._locks.get(session_id) is lock:
                del self._locks[session_id]

    async def _send_locked(
        self,
        principal: Principal,
        session_id: str,
        client_msg_id: str,
        content: str,
        mode_name: str | None,
        file_ids: list[str] | None,
    ) -> SendResult:
        leased: list[str] = []  # the reply whose lease this call took, if any
        charged: list[Charge] = []  # what the rate limits took for it, if anything
        try:
            return await self._store_and_start(
                principal, session_id, client_msg_id, content, mode_name, file_ids, leased, charged
            )
        except BaseException as exc:
            if leased:
                with contextlib.suppress(Exception):
                    await self.leases.release(session_id, leased[0])
            if charged:  # nothing was sent: nothing is owed
                with contextlib.suppress(Exception):
                    await self._refund(charged[0])
            if isinstance(exc, IntegrityError):
                # The same message, sent at once to another instance, was
                # stored first: answer as to a resend.
                duplicate = await self._duplicate(
                    principal, session_id, client_msg_id, content, file_ids
                )
                if duplicate is not None:
                    return duplicate
            raise

    async def _duplicate(
        self,
        principal: Principal,
        session_id: str,
        client_msg_id: str,
        content: str,
        file_ids: list[str] | None,
    ) -> SendResult | None:
        async with self.sessionmaker() as db:
            await repo.get_session(db, team_id=principal.team_id, session_id=session_id)
            return await self._stored(db, principal, session_id, client_msg_id, content, file_ids)

    async def _stored(
        self,
        db: AsyncSession,
        principal: Principal,
        session_id: str,
        client_msg_id: str,
        content: str,
        file_ids: list[str] | None,
    ) -> SendResult | None:
        """The result of the first send of ``client_msg_id``, if it was
        stored; :class:`Conflict` if that send was of another message (other
        content, or other attached files)."""
        existing = await repo.find_by_client_msg_id(
            db, session_id=session_id, client_msg_id=client_msg_id
        )
        if existing is None:
            return None
        other_content = existing.content != content and not await self._stored_as(
            db, principal, existing.mode, content, existing.content
        )
        if other_content or set(stored_file_ids(existing)) != set(file_ids or ()):
            raise Conflict("client_msg_id was already used for a different message in this session")
        reply = await repo.reply_for(db, user_message_id=existing.id)
        return SendResult(
            message=message_view(existing), reply_id=reply.id if reply else None, duplicate=True
        )

    async def _stored_as(
        self,
        db: AsyncSession,
        principal: Principal,
        mode_name: str | None,
        content: str,
        stored: str,
    ) -> bool:
        """Whether ``content`` is stored as ``stored``: the same text once the
        input guardrail of the mode it was sent in redacted it."""
        mode = await modes_repo.resolve_mode(
            db, team_id=principal.team_id, name=mode_name or "chat"
        )
        return mode is not None and check_input(content, mode_policy(mode)).text == stored

    async def _store_and_start(
        self,
        principal: Principal,
        session_id: str,
        client_msg_id: str,
        content: str,
        mode_name: str | None,
        file_ids: list[str] | None,
        leased: list[str],
        charged: list[Charge],
    ) -> SendResult:
        async with transaction(self.sessionmaker) as db:
            chat, sent = await repo.session_for_send(
                db, team_id=principal.team_id, session_id=session_id, client_msg_id=client_msg_id
            )
            if sent is not None:
                stored = await self._stored(
                    db, principal, session_id, client_msg_id, content, file_ids
                )
                if stored is not None:
                    return stored
            if session_id in self._by_session:
                raise Conflict("a reply is already being generated in this session")
            if len(content) > self.settings.max_message_chars:
                raise TooLarge(
                    f"a message may have at most {self.settings.max_message_chars} characters"
                )
            mode = await modes_repo.resolve_mode(
                db, team_id=principal.team_id, name=mode_name or chat.mode
            )
            if mode is None:
                raise BadRequest(f"unknown mode {mode_name or chat.mode!r}")
            # What is stored and sent: redacted per the mode's policy.
            content = _checked_input(content, mode, "the message")
            file_ids = list(dict.fromkeys(file_ids or []))
            attached = [
                await files_repo.get_file(db, team_id=principal.team_id, file_id=file_id)
                for file_id in file_ids
            ]
            attached.sort(key=lambda f: f.created_at, reverse=True)  # newest first
            excerpts = await self._excerpts(attached, mode)
            charge = await self._check_rate(principal, content, *(e.text for e in excerpts))
            charged.append(charge)
            # Ids now, in order (a message sorts before its reply), so that the
            # lease can name the reply before anything is stored.
            message_id, reply_id = new_id(), new_id()
            # One reply per session across every instance: the session's lease.
            if not await self.leases.acquire(
                session_id, reply_id, self.instance_id, self.settings.lease_ttl_s
            ):
                raise Conflict("a reply is already being generated in this session")
            leased.append(reply_id)
            user_row = await repo.add_turn(
                db,
                team_id=principal.team_id,
                session_id=session_id,
                content=content,
                client_msg_id=client_msg_id,
                author_id=principal.member_id,
                mode=mode.name,
                model=self.provider_for(mode).model,
                file_ids=file_ids,
                message_id=message_id,
                reply_id=reply_id,
            )
            last_seq = chat.last_seq
            summary = await summaries.latest(db, session_id=session_id)
            history = await summaries.history_after(
                db,
                session_id=session_id,
                after_id=summary.covers_until if summary else None,
                limit=HISTORY_LIMIT,
            )
            items = [HistoryItem(m.role, m.content, m.id) for m in history]
            view = message_view(user_row)
        await self.log.ensure_floor(session_id, last_seq)
        run = ReplyRun(
            reply_id=reply_id,
            session_id=session_id,
            team_id=principal.team_id,
            user_message_id=message_id,
            mode=mode,
            model=self.provider_for(mode).model,
            provider=self.provider_for(mode),
            history=items,
            summary=summary.text if summary else None,
            files=excerpts,
            member_id=principal.member_id,
            charged_tokens=charge.tokens,
        )
        self.runs[run.reply_id] = run
        self._by_session[session_id] = run
        if run.reply_id in self._early_cancels:  # cancelled between its commit and now
            del self._early_cancels[run.reply_id]
            run.cancelled = True
        # The events, ``message.created`` first, are appended by the task, so
        # that the sender's ack (queued when this returns) comes before them.
        run.task = asyncio.create_task(self._run(run, view), name=f"reply-{run.reply_id}")
        return SendResult(message=view, reply_id=run.reply_id, duplicate=False)

    async def _excerpts(self, attached: list[FileRow], mode: Mode) -> list[FileExcerpt]:
        """The start of each attached text file, as the prompt will hold it,
        through the mode's input guardrail as the message itself is (a file
        the guardrail refuses refuses the message)."""
        excerpts = []
        for file in attached:
            if self.blobs is None or not files_repo.is_text_type(file.content_type):
                continue
            head = await self.blobs.read_head(file.sha256, FILE_EXCERPT_CHARS * 4)
            text = _CONTROL.sub("", head.decode("utf-8", errors="ignore"))
            excerpt = text[: _excerpt_cut(text, mode)]
            checked = _checked_input(excerpt, mode, f"the attached file {file.name!r}")
            excerpts.append(FileExcerpt(file.name, checked))
        return excerpts

    async def _check_rate(self, principal: Principal, *texts: str) -> Charge:
        """Per-user and per-team limits on messages and on the model's tokens
        (per minute). A message is refused while its sender or team
        is over either. Its own tokens (the message's and its attachments',
        estimated) are taken now; what its reply used beyond them, when the
        reply ends (:meth:`_charge_usage`). Returns what was taken; a message
        refused here, or later before it is sent, takes nothing.

        One message is allowed up to the whole limit, so that a message
        larger than the limit is not refused for ever."""
        s = self.settings
        tokens = sum(estimate_tokens(text) for text in texts)
        checks: list[ratelimit.Bucket] = [
            ("messages", f"msg:u:{principal.member_id}", 1, s.rate_user_messages),
            ("messages", f"msg:t:{principal.team_id}", 1, s.rate_team_messages),
            ("tokens", f"tok:u:{principal.member_id}", tokens, s.rate_user_tokens),
            ("tokens", f"tok:t:{principal.team_id}", tokens, s.rate_team_tokens),
        ]
        return Charge(tokens, await ratelimit.take(self.limiter, checks))

    async def _refund(self, charge: Charge) -> None:
        """Give back what :meth:`_check_rate` took."""
        await ratelimit.give_back(self.limiter, charge.taken)

    async def _charge_usage(self, run: ReplyRun, usage: Usage) -> None:
        """The tokens the reply used (its prompt and its output) beyond those
        taken when its message was sent: owed by the sender and the team,
        even past the limit, so their next messages wait until it is paid."""
        s = self.settings
        owed = usage.input_tokens + usage.output_tokens - run.charged_tokens
        if owed > 0:
            buckets = [
                (f"tok:u:{run.member_id}", s.rate_user_tokens),
                (f"tok:t:{run.team_id}", s.rate_team_tokens),
            ]
            await ratelimit.owe(self.limiter, buckets, owed)

    def provider_for(self, mode: Mode) -> LLMProvider:
        """The mode's provider: one of the operator's named providers
        (``CHATHUB_LLM_PROVIDERS``), else the default one."""
        if mode.provider is None or mode.provider == "default":
            return self.provider
        named = self._named.get(mode.provider)
        if named is None:
            raise BadRequest(f"mode {mode.name!r} names an unknown provider {mode.provider!r}")
        return named

    # -- cancelling --------------------------------------------------------

    async def cancel(self, principal: Principal, reply_id: str) -> bool:
        """Ask the instance generating ``reply_id`` to stop it. Idempotent:
        cancelling a finished reply is not an error. Raises NotFound for a
        reply the caller's team does not have."""
        run = self.runs.get(reply_id)
        if run is not None:
            if run.team_id != principal.team_id:
                raise NotFound("reply not found")
            if run.ending:  # its generation is over: it ends as it was ending
                return False
            self._stop(run)
            return True
        async with self.sessionmaker() as db:
            try:
                message = await repo.get_message(db, team_id=principal.team_id, message_id=reply_id)
            except NotFound:
                # One answer for every id the team does not have, running
                # here or not: it tells nothing about other teams' replies.
                raise NotFound("reply not found") from None
        if message.role != "assistant":
            raise NotFound("reply not found")
        if message.status != "streaming":
            return False
        await self.bus.publish(CANCEL_CHANNEL, {"reply_id": reply_id})
        return True

    async def _on_cancel_message(self, message: dict[str, Any]) -> None:
        reply_id = str(message.get("reply_id"))
        run = self.runs.get(reply_id)
        if run is None:
            # Maybe stored and not yet started here: it stops as it starts.
            self._early_cancels[reply_id] = None
            while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                self._early_cancels.popitem(last=False)
        elif not run.ending:
            self._stop(run)

    def _stop(self, run: ReplyRun) -> None:
        run.cancelled = True
        if run.stream_task is not None:
            run.stream_task.cancel()

    # -- generating --------------------------------------------------------

    async def _run(self, run: ReplyRun, user_message: dict[str, Any]) -> None:
        # Its own task: these ids (and the sending request's) stay with it
        # and the tasks it starts, and go no further.
        logs.bind(team=run.team_id, session=run.session_id, reply=run.reply_id)
        helpers = [asyncio.create_task(self._keep_lease(run))]
        if self.settings.reply_checkpoint_s > 0:
            helpers.append(asyncio.create_task(self._checkpoint(run)))
        try:
            await self._run_reply(run, user_message)
        finally:
            for helper in helpers:
                helper.cancel()

    async def _checkpoint(self, run: ReplyRun) -> None:
        """Store the text streamed so far, every ``reply_checkpoint_s`` while
        the reply runs. Should this instance die, the reaper ends the reply
        with the text the session log still holds, and where the log no
        longer has it (a restarted embedded server, a reply longer than the
        log's window, a Redis that lost its data) with this one."""
        stored = 0
        while True:
            await asyncio.sleep(self.settings.reply_checkpoint_s)
            writer = run.writer
            if run.ending or writer is None or len(writer.sent) == stored:
                continue
            stored = len(writer.sent)
            # Shielded: a reply ending meanwhile cancels this task, and a
            # write cut off mid-statement would cost a connection for nothing.
            await asyncio.shield(self._store_checkpoint(run, writer.text, writer.last_seq))

    async def _store_checkpoint(self, run: ReplyRun, text: str, seq: int) -> None:
        """The text so far and, with it, the seq of its last delta as the
        session's ``last_seq``: a log that loses its state (an embedded
        server that died) starts again above every seq handed out before
        this checkpoint."""
        try:
            async with transaction(self.sessionmaker) as db:
                if await repo.checkpoint_reply(db, message_id=run.reply_id, content=text):
                    await repo.set_last_seq(db, session_id=run.session_id, seq=seq)
        except Exception as exc:  # the next one may succeed; the reply goes on
            log.warning("could not store the text of %s so far: %s", run.reply_id, exc)

    async def _keep_lease(self, run: ReplyRun) -> None:
        """Renew the reply's lease while it runs. A lease found taken over (a
        reaper ended the reply while this instance could not renew) stops the
        reply here without a second ending."""
        ttl = self.settings.lease_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            if run.released:
                return
            try:
                if await self.leases.renew(run.session_id, run.reply_id, ttl):
                    continue
                if run.ending or run.released:
                    # Generation is over: a lease the store forgot is not
                    # taken again, or the session would stay held after the
                    # reply ended until that lease lapsed.
                    return
                # Lost: either the store forgot it (a Redis restart), then take
                # it again, or another reply now holds the session.
                if await self.leases.acquire(run.session_id, run.reply_id, self.instance_id, ttl):
                    if run.ending or run.released:
                        await self.leases.release(run.session_id, run.reply_id)
                        return
                    continue
            except Exception as exc:
                log.warning("lease renewal of %s failed: %s", run.reply_id, exc)
                continue
            log.warning("reply %s lost its lease; stopping it", run.reply_id)
            run.lost = True
            self._stop(run)
            return

    async def _run_reply(self, run: ReplyRun, user_message: dict[str, Any]) -> None:
        failure: ProviderError | None = None
        run.writer = DeltaWriter(
            log=self.log,
            session_id=run.session_id,
            reply_id=run.reply_id,
            policy=mode_policy(run.mode),
            holdback_chars=self.settings.guardrail_holdback_chars,
            holdback_ms=self.settings.guardrail_holdback_ms,
            coalesce_s=self.settings.coalesce_ms / 1000,
            coalesce_chars=self.settings.coalesce_chars,
        )
        try:
            await self._append(run, "message.created", {"message": user_message})
            message_seq = run.last_seq
            await self._append(
                run,
                "reply.started",
                {
                    "reply_id": run.reply_id,
                    "message_id": run.user_message_id,
                    "mode": run.mode.name,
                    "model": run.model,
                    "steps": run.mode.steps,
                },
            )
            run.stream_task = asyncio.create_task(self._generate(run))
            await self._announce(run, message_seq, user_message["created_at"])
            if run.cancelled:  # cancelled before there was a stream to stop
                run.stream_task.cancel()
            try:
                async with asyncio.timeout(self.settings.reply_timeout_s):
                    await run.stream_task
            except asyncio.CancelledError:
                if not run.cancelled or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
            except TimeoutError:
                failure = ProviderError("the reply took too long", retryable=True)
                failure.code = "timeout"
            except ProviderError as exc:
                failure = exc  # counted where the provider was called
            except StaleReply:
                log.warning("reply %s was ended or replaced elsewhere; stopping it", run.reply_id)
                run.lost = True
            except LogUnavailable as exc:
                log.error("reply %s stopped: %s", run.reply_id, exc)
                failure = _failure_of(exc)
            except Exception as exc:
                log.exception("reply %s failed", run.reply_id)
                failure = ProviderError(f"internal error: {type(exc).__name__}", retryable=False)
                failure.code = "internal"
        except asyncio.CancelledError:
            # Shutdown: the reply ends explicitly, never silently.
            failure = ProviderError("the server stopped while replying", retryable=True)
            failure.code = "interrupted"
            await asyncio.shield(self._finish(run, failure))
            raise
        except Exception as exc:
            # Before generation began (the session log refused an event): the
            # reply still ends, and frees its session.
            log.exception("reply %s could not start", run.reply_id)
            failure = _failure_of(exc)
        await self._finish(run, failure)

    async def _finish(self, run: ReplyRun, failure: ProviderError | None) -> None:
        run.ending = True
        try:
            text = ""
            if run.writer is not None:
                try:
                    # A reply cut short (cancelled, failed) keeps nothing of
                    # what the guardrail still held: it may be a secret's start.
                    await run.writer.finish(complete=failure is None and not run.cancelled)
                except StaleReply:
                    log.warning("reply %s was ended or replaced elsewhere", run.reply_id)
                    run.lost = True
                except Exception as exc:
                    # The log refused the last deltas (Redis stayed down): the
                    # reply ends with the text it holds, which clients saw.
                    log.error("reply %s: its last deltas were not written: %s", run.reply_id, exc)
                    failure = failure or _failure_of(exc)
                text = run.writer.text
            if run.lost:
                failure = ProviderError("the reply was taken over", retryable=True)
                failure.code = "interrupted"
            usage_view = _usage_view(run, failure)
            usage = Usage(usage_view["input_tokens"], usage_view["output_tokens"])
            if failure is None:
                stop_reason: str
                if run.writer is not None and run.writer.blocked:
                    stop_reason = "blocked"
                elif run.cancelled:
                    stop_reason = "cancelled"
                else:
                    stop_reason = run.end.stop_reason if run.end else "end_turn"
                status = "complete"
            else:
                stop_reason = "error"
                status = "failed"
            # The ending event will be the next after this reply's last one
            # (nothing else appends to a session while its reply runs): its
            # seq is stored with the reply, in one transaction.
            ending_seq = max(run.last_seq, run.writer.last_seq if run.writer else 0) + 1
            view = await self._store_ending(run, text, status, stop_reason, usage_view, ending_seq)
            if view is None:
                # Already ended elsewhere (a reaper): never a second ending.
                log.warning("reply %s was already ended; not ending it again", run.reply_id)
                return
            if failure is None:
                event = await self.log.append(
                    run.session_id,
                    "reply.completed",
                    {
                        "reply_id": run.reply_id,
                        "message": view,
                        "stop_reason": stop_reason,
                        "usage": usage_view,
                    },
                )
            else:
                ending: dict[str, Any] = {
                    "reply_id": run.reply_id,
                    "code": failure.code,
                    "message": failure.message,
                    "retryable": failure.retryable,
                    "partial": view,
                }
                if failure.retryable and failure.retry_after is not None:
                    # The provider said when to come back (Retry-After):
                    # clients wait that long before sending again.
                    ending["retry_after_s"] = round(failure.retry_after, 3)
                event = await self.log.append(run.session_id, "reply.failed", ending)
            # A client that has seen the reply end may send the next message
            # at once: free the session before anything else is awaited.
            await self._release(run)
            metrics.REPLIES.labels(stop_reason=stop_reason).inc()
            await self._charge_usage(run, usage)
            elapsed = time.monotonic() - (run.first_token_at or run.started_at)
            if usage.output_tokens and elapsed > 0:
                metrics.TOKENS_PER_SECOND.observe(usage.output_tokens / elapsed)
            if event.seq > ending_seq:  # something else was appended meanwhile
                async with transaction(self.sessionmaker) as db:
                    await repo.set_last_seq(db, session_id=run.session_id, seq=event.seq)
            await self._announce(run, event.seq, view["completed_at"])
        except Exception:
            metrics.REPLY_ENDINGS_LOST.inc()
            log.exception("could not finish reply %s", run.reply_id)
        finally:
            self.runs.pop(run.reply_id, None)
            await self._release(run)
            run.done.set()
            if run.dropped > 0 and not self._closing:
                # Older turns no longer fit the prompt: fold them into the summary.
                self.summarizer.schedule(run.team_id, run.session_id)
            if failure is None and self.extractor is not None and not self._closing:
                # Also after a turn in a mode with extraction off: the run
                # moves past it (no model call) while the mode still says
                # off, so turning extraction on later does not reach it.
                self.extractor.schedule(run.team_id, run.session_id, run.provider)

    async def _store_ending(
        self,
        run: ReplyRun,
        text: str,
        status: str,
        stop_reason: str,
        usage: dict[str, Any],
        ending_seq: int,
    ) -> dict[str, Any] | None:
        """Store the finished reply, and ``ending_seq`` as the session's
        ``last_seq``; its view, or None when the reply had already ended
        elsewhere. While the database is unreachable (a restart, a
        failover), try again for up to :data:`ENDING_PATIENCE_S`: a reply
        whose ending is not stored never ends for its clients."""

        async def store(again: bool) -> dict[str, Any] | None:
            async with transaction(self.sessionmaker) as db:
                finished: Row[Any] | Message | None = await repo.finish_reply_message(
                    db,
                    message_id=run.reply_id,
                    content=text,
                    status=status,
                    stop_reason=stop_reason,
                    usage=usage,
                    trace={"steps": _guarded_trace(run)} if run.trace else None,
                )
                if finished is None and again:
                    # An earlier try may have committed before its
                    # connection dropped: then that ending is ours.
                    finished = await repo.finished_as(
                        db, message_id=run.reply_id, content=text, stop_reason=stop_reason
                    )
                if finished is None:
                    return None
                await repo.reply_ended(
                    db,
                    session_id=run.session_id,
                    seq=ending_seq,
                    at=finished.completed_at or utcnow(),
                )
                return message_view(finished)

        def retrying(exc: BaseException) -> None:
            log.warning("could not store the end of reply %s yet: %r", run.reply_id, exc)

        return await while_unreachable(store, for_s=ENDING_PATIENCE_S, on_retry=retrying)

    async def _announce(self, run: ReplyRun, last_seq: int, at: str) -> None:
        """Tell the team's session lists that the session moved on (see
        :meth:`SessionFeed.activity`)."""
        if self.session_feed is not None:
            await self.session_feed.activity(run.team_id, run.session_id, last_seq, at)

    async def _append(self, run: ReplyRun, type_: str, data: dict[str, Any]) -> None:
        event = await self.log.append(run.session_id, type_, data)
        run.last_seq = max(run.last_seq, event.seq)

    async def _release(self, run: ReplyRun) -> None:
        """The session may take its next message, here and on every instance
        (idempotent)."""
        if self._by_session.get(run.session_id) is run:
            del self._by_session[run.session_id]
        if not run.released:
            run.released = True
            try:
                await self.leases.release(run.session_id, run.reply_id)
            except Exception as exc:  # it expires by itself
                log.warning("could not release the lease of %s: %s", run.reply_id, exc)

    async def _generate(self, run: ReplyRun) -> None:
        """Run the mode's flow: each structured step in order, its output
        kept in the trace and handed to the next; the last step streams."""
        built = await build_prompt(
            run.mode,
            run.history,
            summary=run.summary,
            files=run.files,
            window=provider_window(run.provider),
            count=provider_counter(run.provider),
        )
        run.dropped = built.dropped
        run.input_tokens = built.input_tokens
        request = built.request
        if len(run.mode.flow) > 1:
            provider = run.provider
            *structured, last = run.mode.flow
            if not isinstance(provider, StructuredOutput):
                raise ProviderError("this provider cannot run reasoning flows", retryable=False)
            for step in structured:
                assert step.output_schema is not None
                step_request = replace(request, system=_step_system(run, step.prompt))
                output = await call_with_retry(
                    functools.partial(
                        provider.structured,
                        step_request,
                        name=step.name,
                        schema=step.output_schema,
                    )
                )
                run.trace.append({"step": step.name, "output": output})
                await self._append(
                    run,
                    "reply.step",
                    {"reply_id": run.reply_id, "step": step.name, "status": "done"},
                )
            request = replace(request, system=_step_system(run, last.prompt))
        await self._pump(run, request)

    async def _pump(self, run: ReplyRun, request: CompletionRequest) -> None:
        """Provider → output guardrail → coalescer → session log."""
        writer = run.writer
        assert writer is not None
        stream: AsyncIterator[StreamEvent] = stream_with_retry(run.provider, request)
        try:
            async for event in stream:
                if isinstance(event, StreamEnd):
                    run.end = event
                    continue
                if not isinstance(event, TextDelta) or not event.text:
                    continue
                run.streamed_chars += len(event.text)
                if run.first_token_at is None:
                    run.first_token_at = time.monotonic()
                    metrics.TIME_TO_FIRST_TOKEN.observe(run.first_token_at - run.started_at)
                if writer.take(event.text):
                    await writer.write_due()
                if writer.blocked:
                    break  # the guardrail stopped the reply: stop generating
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # -- lifecycle ---------------------------------------------------------

    async def wait(self, reply_id: str) -> None:
        run = self.runs.get(reply_id)
        if run is not None:
            await run.done.wait()

    async def close(self) -> None:
        """:meth:`interrupt_all`, then let go of the bus and the providers."""
        await self.interrupt_all()
        self._unsubscribe()
        for named in self._named.values():
            with contextlib.suppress(Exception):
                await named.aclose()

    async def interrupt_all(self) -> None:
        """End every local reply as ``interrupted``, storing its partial
        text, and take no new message: the server is stopping."""
        self._closing = True
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # A reply cancelled before its task ever ran has not ended yet.
        for run in list(self.runs.values()):
            failure = ProviderError("the server stopped while replying", retryable=True)
            failure.code = "interrupted"
            await self._finish(run, failure)


def _failure_of(exc: Exception) -> ProviderError:
    """How a reply stopped by ``exc``, a fault outside the provider, ends:
    ``unavailable`` (retryable) when the log or the database could not be
    reached, else ``internal``."""
    failure = ProviderError(f"internal error: {type(exc).__name__}", retryable=True)
    if isinstance(exc, LogUnavailable) or backend_unreachable(exc):
        failure = ProviderError("the session log or the database was unavailable", retryable=True)
        failure.code = "unavailable"
    else:
        failure.code = "internal"
    return failure


def _usage_view(run: ReplyRun, failure: ProviderError | None = None) -> dict[str, Any]:
    """The reply's usage as stored and sent: the provider's, from the end of
    its stream; else (cancelled, blocked, failed or interrupted before that
    end) the provider's counts that came before its failure, and for the
    others an estimate (the prompt's count, the characters streamed / 4),
    marked ``estimated``."""
    if run.end is not None:
        usage = run.end.usage
        return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    counted_in = failure.input_tokens if failure is not None else None
    counted_out = failure.output_tokens if failure is not None else None
    view: dict[str, Any] = {
        "input_tokens": run.input_tokens if counted_in is None else counted_in,
        "output_tokens": (
            estimate_tokens_of(run.streamed_chars) if counted_out is None else counted_out
        ),
    }
    if counted_in is None or counted_out is None:
        view["estimated"] = True
    return view


def _guarded_trace(run: ReplyRun) -> list[dict[str, Any]]:
    """The flow's steps as stored with the reply: what the model produced
    passes the mode's output guardrail, as its streamed text does (each
    string redacted; a string a rule blocks ends with that rule's
    replacement where the block began)."""
    policy = mode_policy(run.mode)

    def guarded(value: Any) -> Any:
        if isinstance(value, str):
            filtered = redact_all(value, policy)
            for action, rule in filtered.actions:
                metrics.GUARDRAIL_ACTIONS.labels(action=action, rule=rule).inc()
            if filtered.blocked:
                return filtered.text + policy.replacement(filtered.actions[-1][1])
            return filtered.text
        if isinstance(value, list):
            return [guarded(item) for item in value]
        if isinstance(value, dict):
            return {key: guarded(item) for key, item in value.items()}
        return value

    return [{"step": done["step"], "output": guarded(done["output"])} for done in run.trace]


def _step_system(run: ReplyRun, step_prompt: str) -> str:
    """The system prompt of a flow step: the mode's, the step's, and what the
    earlier steps produced."""
    parts = [run.mode.system_prompt, step_prompt]
    for done in run.trace:
        parts.append(f"{done['step']}:\n{orjson.dumps(done['output']).decode()}")
    return "\n\n".join(parts)


EXCERPT_GUARD_MARGIN = 256
"""Characters past an excerpt's cut that its input guardrail also reads."""

# C0 controls other than tab, newline and carriage return: nothing a text
# excerpt should hand the model.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _excerpt_cut(text: str, mode: Mode) -> int:
    """Where an excerpt of ``text`` ends: at :data:`FILE_EXCERPT_CHARS`, or
    past a finding of the mode's guardrail that spans that cut (looking
    :data:`EXCERPT_GUARD_MARGIN` characters past it), so that a secret is
    redacted whole, never sent as a first half too short to be recognised."""
    cut = FILE_EXCERPT_CHARS
    if len(text) <= cut:
        return len(text)
    for finding in detect(text[: cut + EXCERPT_GUARD_MARGIN], mode_policy(mode).detectors):
        start, end = finding.span
        if start < cut < end:
            cut = end
    return cut


def _checked_input(text: str, mode: Mode, what: str) -> str:
    """``text`` through the mode's input guardrail: redacted, or refused
    (Forbidden, naming ``what`` and the rule)."""
    verdict = check_input(text, mode_policy(mode))
    for action, rule in verdict.actions:
        metrics.GUARDRAIL_ACTIONS.labels(action=action, rule=rule).inc()
    if verdict.refused:
        raise Forbidden(
            f"{what} was refused by the {verdict.reason} guardrail", rule=verdict.reason
        )
    return verdict.text
