"""Card numbers grouped with full stops (4111.1111.1111.1111): found when Luhn
says so, streamed exactly as the whole text, and holding no ordinary text
(decimal numbers, dates) longer than before."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chathub.llm.guardrails import HoldbackFilter, Policy
from chathub.llm.guardrails.detectors import CARD_DOTTED, PHONE
from tests.llm.test_guardrails import (
    DEFAULT,
    PROPERTY,
    REFERENCE_POLICIES,
    SEPARATORS,
    compare_exactly,
    compare_with_reference,
    joined,
    rules_in,
    stream,
)


@pytest.mark.parametrize("card", ["4111.1111.1111.1111", "5500.0000.0000.0004"])
def test_cards_grouped_with_full_stops_are_cards(card: str) -> None:
    assert rules_in(f"pay with {card}. Thanks") == [("card", card)]
    for size in (1, 2, 5):
        assert stream(f"pay with {card}. Thanks", [size])[0].text == (
            "pay with [redacted:card]. Thanks"
        )


@pytest.mark.parametrize(
    "text",
    [
        "4111.1111.1111.1112",  # Luhn fails
        "0000.0000.0000.0000",
        "4111.1111.1111.11112",
        "4111.1111.1111.111",
        "4111.1111 1111.1111",
        "v4111.1111.1111.1111",
        "pi is 3.14159, a million 1.000.000, a date 2024.01.15 or 12.05.2026",
        "4111/1111/1111/1111",  # slashes: not a card separator (see the report)
    ],
)
def test_dotted_card_near_misses(text: str) -> None:
    assert rules_in(text) == []
    assert stream(text, [1])[0].text == text


def without_dotted_cards() -> Policy:
    policy = Policy.default()
    dets = tuple(d for d in policy.detectors if d is not CARD_DOTTED)
    object.__setattr__(policy, "detectors", dets)
    return policy


@pytest.mark.parametrize("size", [1, 2, 3])
def test_decimals_and_dates_are_held_no_longer_than_before(size: int) -> None:
    text = (
        "pi 3.14159 and 12/05/2026 or 2026.05.12 and 1.000.000, 4111.1111 x "
        "10.5.2026 1234.5678.9012 v1.2.3 0.25. 4111.1111.1111.1112 ok"
    )
    now = HoldbackFilter(DEFAULT, holdback_chars=128, holdback_ms=math.inf)
    before = HoldbackFilter(without_dotted_cards(), holdback_chars=128, holdback_ms=math.inf)
    for k in range(0, len(text), size):
        chunk = text[k : k + size]
        assert now.feed(chunk, 0.0) == before.feed(chunk, 0.0), k
        assert now.held == before.held
    assert now.flush(0.0) == before.flush(0.0)


@PROPERTY
@given(text=st.text("0123456789. -/+a", max_size=40))
def test_the_dotted_card_tail_is_open_only_where_the_phone_tail_is(text: str) -> None:
    # so the earliest open candidate, hence what is held, is what it was
    for i in range(len(text)):
        for end in range(i + 1, len(text) + 1):
            if CARD_DOTTED.open_at(text, i, end):
                assert PHONE.open_at(text, i, end), (text, i, end)


DOTTED_PIECES = [
    "4111.1111.1111.1111",
    "5500.0000.0000.0004",
    "4111.1111.1111.1112",
    "4111.1111.",
    "4111",
    "1111.",
    "3.14159",
    "1.000.000",
    "12/05/2026",
    "2026.05.12",
    "4111 1111 1111 1111",
    "+44 20 7946 0958",
    ".",
    "..",
]
dotted_texts = joined(
    st.sampled_from(DOTTED_PIECES),
    st.sampled_from(SEPARATORS),
    st.text("0149. -/", max_size=8),
    max_size=14,
)


@PROPERTY
@given(
    text=dotted_texts,
    sizes=st.lists(
        st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 40)), max_size=8, min_size=1
    ),
    which=st.sampled_from(range(len(REFERENCE_POLICIES))),
    holdback_ms=st.sampled_from([10.0, 250.0, math.inf]),
    holdback_chars=st.sampled_from([1, 16, 128]),
    gaps=st.lists(st.sampled_from([0.001, 0.1, 2.0]), min_size=1, max_size=4),
)
def test_texts_with_dotted_cards_give_what_the_reference_gives(
    text: str,
    sizes: list[int],
    which: int,
    holdback_ms: float,
    holdback_chars: int,
    gaps: list[float],
) -> None:
    policy = REFERENCE_POLICIES[which]
    compare_exactly(text, sizes, policy)
    compare_with_reference(
        text,
        sizes,
        policy,
        holdback_chars=holdback_chars,
        holdback_ms=holdback_ms,
        gaps=gaps,
        polls=(True, False),
    )


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize(
    ("chars", "ms", "gap"), [(12, 10.0, 0.001), (16, 250.0, 0.02), (8, 1.0, 0.002)]
)
def test_the_time_limit_counts_from_the_first_character_still_held(
    size: int, chars: int, ms: float, gap: float
) -> None:
    # A forced card replacement covers everything received so far, while the
    # phone candidate at the same place stays open: the held text then starts
    # with the next chunk, and its time limit counts from that chunk's arrival
    # (it used to count from the card's first digit, forcing a redaction early).
    for text in ("4111 1111 1111 1111 1111 1111 x", "4111.1111.1111.11114111.1111.1111.1111"):
        for polls in ((False,), (True, False)):
            compare_with_reference(
                text,
                [size],
                DEFAULT,
                holdback_chars=chars,
                holdback_ms=ms,
                gaps=(gap,),
                polls=polls,
            )
