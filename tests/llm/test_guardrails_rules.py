"""Rules as the audit of the guardrails found them wanting: blocked phrases
with long whitespace runs or longer case forms, a generic secret at the end
of a sentence, card numbers grouped with no-break spaces. Whole text and
stream alike."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chathub.llm.guardrails import HoldbackFilter, Policy, redact_all
from chathub.llm.guardrails.detectors import PHRASE_GAP
from tests.llm.test_guardrails import DEFAULT, PROPERTY, compare_with_reference, stream

# -- blocked phrases with spaces ------------------------------------------------------

SECRET_PLAN = Policy.from_dict({"blocklist": ["secret plan"]})


def test_whitespace_after_the_start_of_a_blocked_phrase_is_held_only_so_far() -> None:
    # a run longer than a phrase's space may stretch to cannot continue the phrase
    f = HoldbackFilter(SECRET_PLAN, holdback_ms=250)
    out = f.feed("the secret", 0.0).text
    held = []
    for k in range(1, 2001):
        out += f.feed("\n", k * 0.1).text + f.poll(k * 0.1 + 0.05).text
        held.append(f.held)
    assert max(held) <= len("secret") + PHRASE_GAP
    assert out == "the secret" + "\n" * 2000
    assert not f.blocked


@pytest.mark.parametrize("gap", [1, 2, PHRASE_GAP - 1, PHRASE_GAP, PHRASE_GAP + 1, 40])
def test_a_phrase_matches_across_at_most_the_gap_whole_or_streamed(gap: int) -> None:
    for space in (" ", "\n", "\t"):
        text = f"the secret{space * gap}plan now"
        reference = redact_all(text, SECRET_PLAN)
        assert reference.blocked == (gap <= PHRASE_GAP)
        for size in (1, 2, 5):
            assert stream(text, [size], SECRET_PLAN)[0] == reference


# -- blocked phrases in any case --------------------------------------------------------


@pytest.mark.parametrize("phrase", ["İstanbul plan", "Plan İ", "çİft", "Straße", "ΣΟΦΙΑ"])
def test_a_blocked_phrase_matches_itself_and_its_cases(phrase: str) -> None:
    policy = Policy.from_dict({"blocklist": [phrase], "rules": {"blocklist": "redact"}})
    for variant in (phrase, phrase.upper(), phrase.lower(), phrase.swapcase()):
        text = f"about {variant} today"
        reference = redact_all(text, policy)
        assert reference.text == "about [redacted:blocklist] today", variant
        for size in (1, 3):
            whole, _ = stream(text, [size], policy, holdback_ms=math.inf)
            assert whole == reference, (variant, size)


def test_a_dotted_capital_i_also_matches_a_plain_i() -> None:
    # re.I folds the dotted capital I with i and I
    policy = Policy.from_dict({"blocklist": ["İstanbul plan"]})
    assert redact_all("the istanbul plan", policy).blocked
    assert redact_all("the ISTANBUL PLAN", policy).blocked
    assert not redact_all("the stanbul plan", policy).blocked


# -- generic secrets at the end of a sentence ------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "password=Zx9kQ2mN8vL4rT6yW1bC3dF5gH7jK0Yw. Done.",
            "password=[redacted:api_key]. Done.",
        ),
        ("token: Zx9kQ2mN8vL4rT6yW1bC3dF5gH7jK0Yw.", "token: [redacted:api_key]."),
        ("pwd=Zx9kQ2mN8vL4rT6y.W1bC3dF5gH7jK0Yw\nok", "pwd=[redacted:api_key]\nok"),
        # only a full stop that ends the sentence is left out
        ("secret=Zx9kQ2mN8vL4rT6y.. next", "secret=[redacted:api_key]. next"),
        ("secret=Zx9kQ2mN8vL4rT6y./x ok", "secret=[redacted:api_key] ok"),
    ],
)
def test_a_generic_secret_leaves_the_full_stop_of_its_sentence(text: str, expected: str) -> None:
    assert redact_all(text, DEFAULT).text == expected
    for size in (1, 4, 100):
        assert stream(text, [size])[0].text == expected
    compare_with_reference(text, [1], DEFAULT, holdback_chars=16, holdback_ms=30.0)


CASE_FORMS = Policy.from_dict(
    {"blocklist": ["Straße", "ﬁx İt", "İ", "secret plan"], "rules": {"phone": "block"}}
)


@PROPERTY
@given(
    text=st.lists(
        st.sampled_from(
            [
                *("STRASSE", "strasse", "STRAS", "Straß", "FIX", "ﬁx", "i̇t", "İT", "İ", "i"),
                *("I", "\u0307", "secret", "SECRET", " ", "  ", "\n" * PHRASE_GAP, "plan", "."),
            ]
        ),
        max_size=12,
    ).map("".join),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
)
def test_phrases_with_longer_case_forms_give_what_the_reference_gives(
    text: str, sizes: list[int]
) -> None:
    compare_with_reference(text, sizes, CASE_FORMS)


# -- card numbers grouped with no-break spaces ------------------------------------------


@pytest.mark.parametrize("sep", ["\u00a0", "\u202f"])
def test_card_digits_grouped_with_no_break_spaces_are_a_card(sep: str) -> None:
    card = sep.join(["4111", "1111", "1111", "1111"])
    text = f"Pay with {card}{sep}now."
    assert redact_all(text, DEFAULT).text == f"Pay with [redacted:card]{sep}now."
    for size in (1, 3, 100):
        compare_with_reference(text, [size], DEFAULT)
        compare_with_reference(text, [size], DEFAULT, holdback_chars=8)
    # Luhn still decides
    other = sep.join(["4111", "1111", "1111", "1112"])
    assert redact_all(f"ref {other}", DEFAULT).text == f"ref {other}"
