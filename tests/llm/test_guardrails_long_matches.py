"""Long matches: a committed match costs the same per chunk however long it
grows, and gives exactly what the whole text gives."""

from __future__ import annotations

import tracemalloc

import pytest

from chathub.llm.guardrails import HoldbackFilter, redact_all
from chathub.llm.guardrails.detectors import EXTEND_CONTEXT
from tests.llm.test_guardrails import (
    DEFAULT,
    compare_long_match,
)

BODY = "aZ9x" * 100
assert len(BODY) > EXTEND_CONTEXT
PEM_LINES = "\n".join(["MIIEpAIBAAKCAQEAq3Zx" * 3] * 8)
HEADER = "-----BEGIN RSA PRIVATE KEY-----"
FOOTER = "-----END RSA PRIVATE KEY-----"

LONG_MATCHES = [
    f"key sk-{BODY} ok",
    f"key sk-{BODY}",
    f"tok ghp_{BODY}_tail and more",  # "_" ends a ghp_ token
    f"tok github_pat_{BODY}_still_it. ok",
    f"tok xoxb-{BODY}-more-{BODY}!",
    f"tok chk_0a1b2c3d_{BODY} ok",
    f"mail a@b.co{'.cd' * 150}-x.y ok",
    f"mail a@b.co{'.cd' * 150}..x ok",
    f"password={BODY}. Done.",
    f"password='{BODY}' and api_key: {BODY}.",
    f"x {HEADER}\n{PEM_LINES}\n{FOOTER} ok",
    f"x {HEADER}\n{PEM_LINES}\n-----END RSA PRIVATE KEY--- {FOOTER}\n",
    f"x {HEADER}\n{PEM_LINES}",
    # a footer right after the header, and one sharing the header's dashes
    f"x {HEADER}{FOOTER} ok",
    f"x -----BEGIN PRIVATE KEY-----END PRIVATE KEY----- {PEM_LINES} {FOOTER} ok",
]


@pytest.mark.parametrize("sizes", [[1], [3, 1, 2], [7, 300], [1000]])
@pytest.mark.parametrize("text", LONG_MATCHES)
def test_long_committed_matches_give_what_the_reference_gives(text: str, sizes: list[int]) -> None:
    compare_long_match(text, sizes)


def test_a_footer_split_across_chunks_is_found_far_from_the_header() -> None:
    text = f"x {HEADER}\n{PEM_LINES}\n{FOOTER} ok"
    assert redact_all(text, DEFAULT).text == "x [redacted:private_key] ok"
    for cut in range(len(text) - len(FOOTER) - 4, len(text)):
        f = HoldbackFilter(DEFAULT)
        out = f.feed(text[:cut], 0.0).text + f.feed(text[cut:], 0.1).text + f.flush(0.2).text
        assert out == "x [redacted:private_key] ok", cut


COMMITTED = [
    ("sk-", "aZ9x", ""),
    ("ghp_", "aZ9x", ""),
    ("a@b.co", ".cd", ""),
    ("password=aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0x", "aZ9x", ""),
    (HEADER + "\n", "MII\n", FOOTER),
]


@pytest.mark.parametrize(("head", "unit", "end"), COMMITTED)
def test_a_chunk_of_a_long_committed_match_copies_none_of_it(
    head: str, unit: str, end: str
) -> None:
    # Replaced early, then swallowed: a chunk is checked on its own (and a
    # bounded look-back), so the filter never copies or rescans the match.
    f = HoldbackFilter(DEFAULT)
    first = f.feed("see " + head, 0.0).text + f.feed(unit * 250, 0.0).text
    assert first.startswith("see ") and first.endswith("]")
    for _ in range(200):  # some 200 000 characters of one match
        assert f.feed(unit * 250, 0.0).text == ""
    tracemalloc.start()
    try:
        for _ in range(10):
            assert f.feed(unit, 0.0).text == ""
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000
    assert f.held == 0
    assert f.feed(end + " after", 0.0).text == " "
    assert f.flush(0.0).text == "after"
