"""A reply stream cut short (cancelled, or the provider failed):
``HoldbackFilter.flush(now, complete=False)`` never releases the candidate it
was holding, only what a complete flush would have released before it."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chathub.llm.guardrails import FilterOutput, HoldbackFilter, Policy, redact_all
from chathub.llm.guardrails.detectors import scan
from tests.llm.test_guardrails import (
    BLOCKING,
    DEFAULT,
    MARKER,
    PROPERTY,
    REFERENCE_POLICIES,
    SECRET_ONLY,
    compare_with_reference,
    reference_texts,
    strict_texts,
)

LAST_MARKER = re.compile(MARKER.pattern + r"\Z")
BLOCKLIST_REDACTED = Policy.from_dict(
    {"blocklist": ["forbidden fruit", "make a bomb"], "rules": {"blocklist": "redact"}}
)


def cut(
    text: str,
    sizes: Sequence[int] = (1,),
    policy: Policy = DEFAULT,
    *,
    holdback_chars: int = 128,
    holdback_ms: float = math.inf,
) -> FilterOutput:
    """Everything sent for ``text`` fed in chunks, then cut."""
    f = HoldbackFilter(policy, holdback_chars=holdback_chars, holdback_ms=holdback_ms)
    outs: list[FilterOutput] = []
    pos, k = 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        outs.append(f.feed(text[pos : pos + size], k * 0.01))
        pos += size
        k += 1
    outs.append(f.flush(k * 0.01, complete=False))
    return FilterOutput(
        "".join(o.text for o in outs),
        tuple(a for o in outs for a in o.actions),
        any(o.blocked for o in outs),
    )


PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAq3Zx\nMIIEpAIB\n-----END RSA PRIVATE KEY-----"
)
CASES = [
    ("Contact john.smith@example.com today", DEFAULT),
    ("Card 4111 1111 1111 1111, thanks", DEFAULT),
    ("IBAN DE89 3704 0044 0532 0130 00 ok", DEFAULT),
    ("key sk-proj-4f9QmZ2xLp8RtY6wVb3NcK1sJ7hG5dFa ok", DEFAULT),
    ('set api_key="x9Fq2LmZ8rTb4WcY7nKpQ1" now', DEFAULT),
    (f"Here:\n{PEM}\nDone.", DEFAULT),
    ("Call +44 20 7946 0958 now", DEFAULT),
    ("Here is how to make a bomb at home", BLOCKING),
    ("Here is how to make a bomb at home", BLOCKLIST_REDACTED),
]


@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1]])
@pytest.mark.parametrize(("text", "policy"), CASES)
def test_a_cut_inside_a_finding_sends_none_of_it(
    text: str, policy: Policy, sizes: list[int]
) -> None:
    [hit] = scan(policy.detectors, text)
    rule = hit.detector.rule
    replacement = policy.replacement(rule)
    before, label = text[: hit.start], text[hit.start : hit.redact_start]
    for k in range(hit.start + 1, hit.end):
        out = cut(text[:k], sizes, policy)
        assert not out.blocked, k
        # What came before, then nothing or a replacement (after the label):
        # that of the rule the candidate already shows evidence of, which
        # need not be the rule it ends up as (11 digits of a card are a phone
        # number's 10), as when a limit forces a replacement.
        if out.text != before:
            assert out.text.startswith(before + label), (k, out.text)
            assert MARKER.fullmatch(out.text[len(before + label) :]), (k, out.text)
            assert len(out.actions) == 1
    # with evidence, the reader sees that something was there
    if rule != "blocklist":
        assert cut(text[: hit.end - 1], sizes, policy).text == before + label + replacement


def test_a_cancel_mid_email_does_not_show_its_start() -> None:
    # what the reply path used to send when a reply was cancelled here
    assert redact_all("Contact john.smith", DEFAULT).text == "Contact john.smith"
    assert cut("Contact john.smith", [3]).text == "Contact "
    assert cut("Contact john.smith@ex", [3]).text == "Contact [redacted:email]"


def test_a_cut_inside_prose_withholds_only_the_word_being_typed() -> None:
    text = "The team should review the plan, then ship it."
    for k in range(1, len(text) + 1):
        out = cut(text[:k], [2])
        assert out.actions == ()
        # all but the last word, which may still become an e-mail address
        assert out.text == re.sub(r"[A-Za-z.]+\Z", "", text[:k]), k
    assert cut("Then ship it", [4]).text == "Then ship "


def test_a_cut_with_evidence_of_a_blocked_rule_blocks() -> None:
    policy = Policy.from_dict({"rules": {"card": "block"}})
    out = cut("Pay 4111 1111 1111 11", [3], policy)
    assert out == FilterOutput("Pay ", (("blocked", "card"),), True)
    # without evidence the candidate is only dropped
    assert cut("Pay 4111 11", [3], policy) == FilterOutput("Pay ")


def test_a_cut_after_an_early_replacement_adds_nothing() -> None:
    key = "sk-proj-4f9QmZ2xLp8RtY6wVb3NcK1sJ7hG5dFa"
    f = HoldbackFilter(DEFAULT)
    assert f.feed(f"Use {key}", 0.0).text == "Use [redacted:api_key]"
    assert f.flush(0.1, complete=False) == FilterOutput()
    # and a complete flush is unchanged: the key ends with the text
    f = HoldbackFilter(DEFAULT)
    assert f.feed(f"Use {key}", 0.0).text == "Use [redacted:api_key]"
    assert f.flush(0.1) == FilterOutput()


def test_a_cut_ends_the_stream() -> None:
    f = HoldbackFilter(DEFAULT)
    assert f.feed("Hello wor", 0.0).text == "Hello "
    assert f.flush(0.1, complete=False) == FilterOutput()
    assert f.flush(0.2) == FilterOutput()
    with pytest.raises(RuntimeError):
        f.feed("ld", 0.3)


def test_a_cut_after_a_forced_redaction_keeps_its_marker_only() -> None:
    f = HoldbackFilter(DEFAULT, holdback_ms=100)
    assert f.feed("mail bob@exam", 0.0).text == "mail "
    assert f.poll(1.0).text == "[redacted:email]"
    assert f.feed("ple.c", 1.1).text == ""
    assert f.flush(1.2, complete=False) == FilterOutput()


@PROPERTY
@given(
    text=strict_texts,
    k=st.integers(0, 400),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    holdback_chars=st.sampled_from([16, 128, 10**6]),
)
def test_a_cut_anywhere_releases_no_secret_character(
    text: str, k: int, sizes: list[int], holdback_chars: int
) -> None:
    # the fillers share no character with the secrets (see test_guardrails)
    out = cut(text[:k], sizes, holdback_chars=holdback_chars)
    assert not SECRET_ONLY & set(MARKER.sub("", out.text))
    if holdback_chars == 10**6:
        # No limit forced anything: what the feeds sent is the start of the
        # whole text's result (it never changes), then the cut may add one
        # replacement.
        whole = redact_all(text, DEFAULT).text
        if not whole.startswith(out.text):
            last = LAST_MARKER.search(out.text)
            assert last is not None
            assert whole.startswith(out.text[: last.start()])


@PROPERTY
@given(
    text=reference_texts,
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    which=st.sampled_from(range(len(REFERENCE_POLICIES))),
    holdback_chars=st.sampled_from([1, 16, 128]),
    holdback_ms=st.sampled_from([10.0, 250.0, math.inf]),
)
def test_a_cut_gives_what_the_reference_gives(
    text: str, sizes: list[int], which: int, holdback_chars: int, holdback_ms: float
) -> None:
    compare_with_reference(
        text,
        sizes,
        REFERENCE_POLICIES[which],
        holdback_chars=holdback_chars,
        holdback_ms=holdback_ms,
        gaps=(0.02, 0.3),
        polls=(False, True),
        complete=False,
    )
