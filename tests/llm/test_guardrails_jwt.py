"""JSON Web Tokens under the ``api_key`` rule: found whole, committed as soon
as they are certain, and streamed with exactly the whole text's result."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chathub.llm.guardrails import HoldbackFilter, Policy, redact_all
from chathub.llm.guardrails.detectors import EXTEND_CONTEXT, JWT
from tests.llm.test_guardrails import (
    DEFAULT,
    PROPERTY,
    REFERENCE_POLICIES,
    SEPARATORS,
    compare_exactly,
    compare_long_match,
    compare_with_reference,
    joined,
    rules_in,
    stream,
    token_sizes,
)

HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
PAYLOAD = "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
SIGNATURE = "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
TOKEN = f"{HEADER}.{PAYLOAD}.{SIGNATURE}"
MARK = "[redacted:api_key]"
# longer than an e-mail's local part, whose tail holds shorter ones anyway
LONG_HEADER = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6Im5PbzNaRHJPRFhFSzFqS1doWHNsSFJfS1hFZyIs"
    "ImtpZCI6Im5PbzNaRHJPRFhFSzFqS1doWHNsSFJfS1hFZyJ9"
)


@pytest.mark.parametrize(
    "token",
    [
        TOKEN,
        f"{HEADER}.{PAYLOAD}.",  # unsecured (alg "none"): the last dot stays
        f"{HEADER}.{PAYLOAD}",
        "eyJ0eXAiOi.eyJpc3MiOi.sig-_0",
        f"{HEADER}.{PAYLOAD}.{SIGNATURE}.more.segments",
    ],
)
def test_jwts_are_api_keys(token: str) -> None:
    found = token.rstrip(".")
    assert rules_in(f"Authorization: Bearer {token} ok") == [("api_key", found)]
    assert (
        redact_all(f"Bearer {token}\n", DEFAULT).text
        == "Bearer " + MARK + token[len(found) :] + "\n"
    )


def test_a_jwt_that_ends_a_sentence_leaves_its_full_stop() -> None:
    text = f"The token is {TOKEN}. Keep it safe."
    assert redact_all(text, DEFAULT).text == f"The token is {MARK}. Keep it safe."
    for size in (1, 2, 5, 1000):
        assert stream(text, [size])[0].text == f"The token is {MARK}. Keep it safe."


@pytest.mark.parametrize(
    "text",
    [
        "eyes, eyebrows and eyJust words",
        f"{HEADER} alone is no token",
        f"{HEADER}.eyJshort here",  # a payload of 8 characters
        "eyJshort.eyJzdWIiOiIx",  # a header of 8 characters
        f"{HEADER}.{SIGNATURE}",  # the second segment is no JSON object
        f"x{TOKEN}",  # inside a word
        f"{HEADER}..{PAYLOAD}",
        "eyJ" + "a" * 600 + f".{PAYLOAD}",  # a header past the longest one
    ],
)
def test_jwt_near_misses(text: str) -> None:
    assert rules_in(text) == []
    assert stream(text, [1], holdback_chars=10**9)[0].text == text


@pytest.mark.parametrize("header", [HEADER, LONG_HEADER, "eyJ" + "x" * 509])
def test_every_beginning_of_a_jwt_is_an_open_candidate(header: str) -> None:
    token = f"{header}.{PAYLOAD}.{SIGNATURE}"
    for end in range(1, len(token) + 1):
        assert JWT.open_at(token, 0, end), token[:end]
    assert not JWT.open_at(token + " ", 0)
    assert not JWT.open_at(f"{header}..", 0)


@pytest.mark.parametrize("header", [HEADER, LONG_HEADER])
def test_a_jwt_is_replaced_as_soon_as_its_payload_shows(header: str) -> None:
    text = f"use Bearer {header}.{PAYLOAD}.{SIGNATURE} now"
    f = HoldbackFilter(DEFAULT, holdback_chars=10_000, holdback_ms=math.inf)
    sent = ""
    certain = text.index(PAYLOAD) + 10  # the header, a dot and 10 payload characters
    for k, ch in enumerate(text):
        sent += f.feed(ch, 0.0).text
        if k + 1 >= certain and k + 1 <= text.index(" now"):
            assert sent == "use Bearer " + MARK, k
            assert f.held == 0
    sent += f.flush(0.0).text
    assert sent == f"use Bearer {MARK} now"


def test_a_long_jwt_holds_nothing_visible_however_long_it_grows() -> None:
    payload = "eyJ" + "aZ9x_-" * 400
    text = f"tok {HEADER}.{payload}.{SIGNATURE} end"
    f = HoldbackFilter(DEFAULT, holdback_chars=64, holdback_ms=math.inf)
    outs = []
    for k in range(0, len(text), 3):
        outs.append(f.feed(text[k : k + 3], 0.0).text)
        if k > text.index(payload) + 12 and k + 3 <= text.index(" end"):
            assert f.held == 0
    outs.append(f.flush(0.0).text)
    assert "".join(outs) == f"tok {MARK} end"
    assert not any("eyJ" in o or "aZ9x" in o for o in outs)


def test_prose_words_beginning_with_e_are_held_no_longer_than_the_word() -> None:
    text = "even eyes expect every eye, eyJ eyJx ey e. Done"
    f = HoldbackFilter(DEFAULT, holdback_chars=128, holdback_ms=math.inf)
    for k, ch in enumerate(text):
        f.feed(ch, 0.0)
        if ch == " ":
            assert f.held == 0, text[: k + 1]
    assert f.flush(0.0).text == "Done"


def test_a_stalled_jwt_header_is_redacted_when_a_limit_runs_out() -> None:
    # "eyJ" and 8 characters is evidence, as a key prefix and a few characters
    text = f"see {HEADER}"
    f = HoldbackFilter(DEFAULT, holdback_chars=128, holdback_ms=100.0)
    assert f.feed(text, 0.0).text == "see "
    assert f.poll(0.2).text == MARK
    rest = f".{PAYLOAD}.{SIGNATURE} ok"
    assert f.feed(rest, 0.3).text == " "  # "ok" may still be a word of more
    assert f.flush(0.4).text == "ok"


LONG = "eyJ" + "aZ9x" * 100
assert len(LONG) > EXTEND_CONTEXT
LONG_JWTS = [
    f"a {TOKEN} b",
    f"Bearer {TOKEN}",
    f"a {HEADER}.{LONG}.{LONG[3:]} b",
    f"a {HEADER}.{LONG}.{LONG[3:]}.x.y. b",
    f"a {HEADER}.{LONG}..{SIGNATURE} b",
    f"a {HEADER}.{LONG}. Next",
    f"a {LONG_HEADER}.{PAYLOAD}.{SIGNATURE} b",
    f"a {LONG_HEADER}.{PAYLOAD[:9]} b {LONG_HEADER}. {LONG_HEADER}",
    f"a {'eyJ' + 'x' * 509}.{PAYLOAD} b {'eyJ' + 'x' * 510}.{PAYLOAD}",
    f"{TOKEN}@example.com and {TOKEN}-----BEGIN PRIVATE KEY-----\nMIIB",
    f"token: {TOKEN}. password={TOKEN}",
]


@pytest.mark.parametrize("sizes", [[1], [3, 1, 2], [7, 300], [1000]])
@pytest.mark.parametrize("text", LONG_JWTS)
def test_long_jwts_give_what_the_reference_gives(text: str, sizes: list[int]) -> None:
    compare_long_match(text, sizes)


JWT_PIECES = [
    TOKEN,
    f"{LONG_HEADER}.{PAYLOAD}.{SIGNATURE}",
    f"{LONG_HEADER}.",
    LONG_HEADER,
    f"Bearer {TOKEN}",
    f"{HEADER}.{PAYLOAD}",
    f"{HEADER}.{PAYLOAD}.",
    HEADER,
    f"{HEADER}.",
    f"{HEADER}.eyJ",
    "eyJ",
    "ey",
    "e",
    "eye",
    "even",
    ".",
    "..",
    "eyJ0eXAiOi",
    "eyJpc3MiOi",
    "aZ9x_-",
    "sk-",
    "a@b",
    "4111 1111 1111 1111",
]
jwt_texts = joined(
    st.sampled_from(JWT_PIECES),
    st.sampled_from(SEPARATORS),
    st.text("eyJaZ09_-. @\n", max_size=8),
    max_size=16,
)


@PROPERTY
@given(
    text=jwt_texts,
    sizes=token_sizes(200),
    which=st.sampled_from(range(len(REFERENCE_POLICIES))),
)
def test_texts_with_jwts_stream_exactly_as_the_whole_text(
    text: str, sizes: list[int], which: int
) -> None:
    compare_exactly(text, sizes, REFERENCE_POLICIES[which])


@PROPERTY
@given(
    text=jwt_texts,
    sizes=token_sizes(200),
    gaps=st.lists(st.sampled_from([0.001, 0.02, 0.1, 0.3, 2.0]), min_size=1, max_size=6),
    polls=st.lists(st.booleans(), min_size=1, max_size=4),
    holdback_ms=st.sampled_from([10.0, 100.0, 250.0, math.inf]),
    holdback_chars=st.sampled_from([1, 8, 16, 64, 128]),
    complete=st.booleans(),
)
def test_texts_with_jwts_under_limits_give_what_the_reference_gives(
    text: str,
    sizes: list[int],
    gaps: list[float],
    polls: list[bool],
    holdback_ms: float,
    holdback_chars: int,
    complete: bool,
) -> None:
    compare_with_reference(
        text,
        sizes,
        DEFAULT,
        holdback_chars=holdback_chars,
        holdback_ms=holdback_ms,
        gaps=gaps,
        polls=polls,
        complete=complete,
    )


def test_jwts_need_no_policy_rule_of_their_own() -> None:
    policy = Policy.from_dict({"rules": {"api_key": "allow"}})
    assert redact_all(f"Bearer {TOKEN}", policy).text == f"Bearer {TOKEN}"
    blocking = Policy.from_dict({"rules": {"api_key": "block"}})
    out = redact_all(f"Bearer {TOKEN}", blocking)
    assert out.blocked and out.actions == (("blocked", "api_key"),)
    assert stream(f"Bearer {TOKEN}", [2], blocking)[0] == out
