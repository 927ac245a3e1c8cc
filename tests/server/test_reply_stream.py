"""The reply stream: provider tokens → output guardrail → coalescer → log,
with coalescing off (the filter sees every token) and on (it sees the
tokens of a delta together, once the delta is due)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chathub.llm.guardrails import Policy, redact_all
from chathub.server.reply_stream import DeltaWriter
from chathub.server.session_log import Event, LogUnavailable, MemorySessionLog

TEXT = (
    "Sure. Write to ana.lopez@example.com, or call +44 20 7946 0958. "
    "Card 4111 1111 1111 1111 works; the key sk-ant-api03-Zx8QwErTyUiOp1234567890AbCd "
    "is not for sharing. That is all for today! " * 3
)
SECRETS = ("ana.lopez", "7946 0958", "1111 1111", "Zx8QwErTy")


def _writer(
    log: MemorySessionLog,
    *,
    coalesce_s: float,
    coalesce_chars: int = 512,
    holdback_ms: float = 250,
) -> DeltaWriter:
    return DeltaWriter(
        log=log,
        session_id="s1",
        reply_id="r1",
        policy=Policy.default(),
        holdback_chars=128,
        holdback_ms=holdback_ms,
        coalesce_s=coalesce_s,
        coalesce_chars=coalesce_chars,
    )


def _events(log: MemorySessionLog) -> list[Event]:
    seen: list[Event] = []
    log.add_listener(seen.append)
    return seen


def _deltas(events: list[Event]) -> list[str]:
    return [e.data()["text"] for e in events if e.type == "reply.delta"]


@pytest.mark.parametrize("coalesce_s", [0.0, 0.03], ids=["off", "30ms"])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
async def test_deltas_equal_the_whole_text_filter_however_it_is_cut(
    coalesce_s: float, size: int
) -> None:
    log = MemorySessionLog()
    events = _events(log)
    writer = _writer(log, coalesce_s=coalesce_s, coalesce_chars=64)
    for i in range(0, len(TEXT), size):
        await writer.write(TEXT[i : i + size])
        if i % 50 == 0:
            await asyncio.sleep(0)
    await writer.finish()
    deltas = _deltas(events)
    expected = redact_all(TEXT, Policy.default())
    assert "".join(deltas) == expected.text == writer.text
    for secret in SECRETS:
        assert all(secret not in d for d in deltas)
    rules = sorted(e.data()["rule"] for e in events if e.type == "reply.guardrail")
    assert rules == sorted(rule for _, rule in expected.actions)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert writer.last_seq == events[-1].seq  # the reply's ending comes next


async def test_with_coalescing_on_a_token_is_only_collected_until_the_delta_is_due() -> None:
    log = MemorySessionLog()
    events = _events(log)
    writer = _writer(log, coalesce_s=0.05, coalesce_chars=100)
    plain = "a few words " * 50  # 600 characters
    for i in range(0, len(plain), 2):
        await writer.write(plain[i : i + 2])
    # The size limit: one delta per 100 characters collected (less what the
    # filter holds back: the word being typed).
    deltas = _deltas(events)
    assert len(deltas) == 6
    assert all(90 <= len(d) <= 110 for d in deltas)
    await writer.finish()
    assert "".join(_deltas(events)) == plain


async def test_with_coalescing_on_collected_tokens_are_written_when_their_time_is_up() -> None:
    log = MemorySessionLog()
    events = _events(log)
    writer = _writer(log, coalesce_s=0.03, coalesce_chars=512)
    for token in ("Hello", " there,", " friend. "):
        await writer.write(token)
    assert _deltas(events) == []  # collected, not yet due
    await asyncio.sleep(0.1)
    # Due: filtered and written without another token or finish().
    assert "".join(_deltas(events)) == "Hello there, friend. "
    await writer.write("Bye")
    await writer.finish()
    assert "".join(_deltas(events)) == "Hello there, friend. Bye"


@pytest.mark.parametrize("coalesce_s", [0.0, 0.03], ids=["off", "30ms"])
async def test_a_blocked_phrase_ends_the_output(coalesce_s: float) -> None:
    log = MemorySessionLog()
    events = _events(log)
    policy = Policy.from_dict({"blocklist": ["pay with"], "safe_message": "Sorry."})
    writer = DeltaWriter(
        log=log,
        session_id="s1",
        reply_id="r1",
        policy=policy,
        holdback_chars=128,
        holdback_ms=250,
        coalesce_s=coalesce_s,
        coalesce_chars=16,
    )
    text = "You could pay with a card, then more text follows here."
    for i in range(0, len(text), 3):
        await writer.write(text[i : i + 3])
        if writer.blocked:
            break
    await writer.finish()
    streamed = "".join(_deltas(events))
    assert writer.blocked
    # the safe message comes as a paragraph of its own
    assert streamed == "You could \n\nSorry."
    assert [(e.type, e.data().get("action")) for e in events[-1:]] == [
        ("reply.guardrail", "blocked")
    ]
    assert writer.last_seq == events[-1].seq


@pytest.mark.parametrize("coalesce_s", [0.0, 0.03], ids=["off", "30ms"])
@pytest.mark.parametrize(
    ("said", "kept"),
    [
        ("Write to ana.lo", "Write to "),  # no sign of an address yet: dropped
        ("Write to ana.lopez@exam", "Write to [redacted:email]"),
        ("Card 4111 1111 1111 11", "Card [redacted:card]"),
        ("That is all for tod", "That is all for "),
    ],
)
async def test_a_stream_cut_short_keeps_nothing_the_guardrail_held(
    coalesce_s: float, said: str, kept: str
) -> None:
    """Cancelled or failed mid-stream, the reply ends without the text the
    guardrail was holding back: it may be the start of a secret."""
    log = MemorySessionLog()
    events = _events(log)
    writer = _writer(log, coalesce_s=coalesce_s)
    for i in range(0, len(said), 2):
        await writer.write(said[i : i + 2])
    await writer.finish(complete=False)
    assert "".join(_deltas(events)) == writer.text == kept


async def test_held_text_is_redacted_when_its_own_hold_back_time_is_up() -> None:
    """The time limit counts from the arrival of the oldest text still held,
    not from when the writer last looked: a card number that arrives while
    a word is held is redacted one window after it came, not later."""
    log = MemorySessionLog()
    loop = asyncio.get_running_loop()
    redacted = loop.create_future()

    def seen(event: Event) -> None:
        if event.type == "reply.guardrail" and not redacted.done():
            redacted.set_result(loop.time())

    log.add_listener(seen)
    writer = _writer(log, coalesce_s=0.0, holdback_ms=1000)
    await writer.write("Pay wi")  # "wi" is held: no sign of a pattern
    await asyncio.sleep(0.5)
    card_came = loop.time()
    await writer.write("th 4111 1111 1111 1")  # 13 digits: evidence of a card
    redacted_at = await asyncio.wait_for(redacted, 5)
    assert redacted_at - card_came >= 0.99  # not before its window is up
    # one window after it came (the writer's first look, 0.5 s earlier, was
    # too soon for it); looking again a window after that would be 1.5 s
    assert redacted_at - card_came < 1.3
    await writer.finish()
    assert writer.text == "Pay with [redacted:card]"


@pytest.mark.parametrize("coalesce_s", [0.0, 0.03], ids=["off", "30ms"])
async def test_a_surrogate_pair_split_across_tokens_is_joined(coalesce_s: float) -> None:
    """Some proxies cut text by UTF-16 unit: the halves of an emoji arrive
    in two tokens. Each delta holds whole code points (a lone half, which no
    JSON encoder takes, becomes U+FFFD)."""
    log = MemorySessionLog()
    events = _events(log)
    writer = _writer(log, coalesce_s=coalesce_s)
    for token in ("smile ", "\ud83d", "\ude00", " done ", "\ude00", "x", "\ud83d"):
        await writer.write(token)
        await asyncio.sleep(0.05)  # each token its own delta where it can be
    await writer.finish()
    assert writer.text == "smile \U0001f600 done \ufffdx\ufffd"
    assert "".join(_deltas(events)) == writer.text


class FailingLog(MemorySessionLog):
    """An in-process log whose appends await (as Redis's do) and that
    refuses the ``fail_at``-th delta as an unreachable store would."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.deltas = 0

    append_now = None  # type: ignore[assignment]

    async def append(self, session_id: str, type: str, data: dict[str, Any]) -> Event:
        await asyncio.sleep(0)
        if type == "reply.delta":
            self.deltas += 1
            if self.deltas == self.fail_at:
                raise LogUnavailable("the session log could not take reply.delta")
        return MemorySessionLog.append_now(self, session_id, type, data)


@pytest.mark.parametrize("coalesce_s", [0.0, 0.02], ids=["off", "20ms"])
async def test_after_a_delta_the_log_refused_nothing_more_is_written(coalesce_s: float) -> None:
    """A delta lost in the middle would leave a hole in the reply: after a
    refused write (in the background, for coalesced deltas, too) the next
    token and the end raise, and the deltas written are the writer's text."""
    log = FailingLog(fail_at=3)
    events = _events(log)
    writer = _writer(log, coalesce_s=coalesce_s)
    words = [f"word{i} " for i in range(40)]
    with pytest.raises(LogUnavailable):
        for word in words:
            await writer.write(word)
            await asyncio.sleep(0.01)
        await writer.finish()
    with pytest.raises(LogUnavailable):
        await writer.finish()
    assert log.deltas == 3
    written = "".join(_deltas(events))
    assert written == writer.text
    assert "".join(words).startswith(written) and written
