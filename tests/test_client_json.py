"""``find_problem``: what a client's JSON may not hold, and where it says it is."""

from __future__ import annotations

from typing import Any

import pytest

from chathub.client_json import MAX_DEPTH, find_problem


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [None, 1, 1.5, True, "", "text", {"a": ["b", {"c": 1}]}, nested(MAX_DEPTH), "\u2028\ufeff"],
)
def test_sound_values_have_no_problem(value: Any) -> None:
    assert find_problem(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("\x00", "value: contains a NUL character"),
        ({"title": "a\x00b"}, "title: contains a NUL character"),
        ({"file_ids": ["a", "b\x00"]}, "file_ids[1]: contains a NUL character"),
        ({"a": {"b": [0, {"c": "\x00"}]}}, "a.b[1].c: contains a NUL character"),
        ({"a": {"k\x00": 1}}, "a: a key contains a NUL character"),
        (nested(MAX_DEPTH + 1), f"[0]: nested deeper than {MAX_DEPTH} levels"),
        ({"value": nested(MAX_DEPTH)}, f"value: nested deeper than {MAX_DEPTH} levels"),
        (("tuple", "\x00"), "[1]: contains a NUL character"),
    ],
)
def test_problems_name_where_they_are(value: Any, problem: str) -> None:
    found = find_problem(value)
    assert found is not None and found.startswith(problem), found


def test_where_prefixes_the_path() -> None:
    assert find_problem({"a": "\x00"}, where="body") == "body.a: contains a NUL character (\\u0000)"


def test_a_value_far_deeper_than_the_stack_is_a_problem_not_a_crash() -> None:
    found = find_problem(nested(100_000))
    assert found is not None and "nested deeper" in found
