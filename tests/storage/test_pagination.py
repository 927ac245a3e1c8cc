"""Cursors are client input: ``decode_cursor`` takes only a key of the key
column's type (and range), so a forged cursor is a 400, never a query the
database refuses."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from chathub.errors import BadRequest
from chathub.storage.models import ChatSession, Message, StateVersion
from chathub.storage.pagination import decode_cursor, encode_cursor


def forged(key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": key}).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("column", "key"),
    [
        (ChatSession.id, "01a2256d-5df0-7ab3-a73c-5f19b3359001"),
        (ChatSession.id, ""),
        (StateVersion.key, "project.phase"),
        (StateVersion.version, 0),
        (StateVersion.version, 2**31 - 1),
        (StateVersion.version, -(2**31)),
        (ChatSession.last_seq, 2**63 - 1),
    ],
)
def test_keys_of_the_column_type_round_trip(column: Any, key: Any) -> None:
    assert decode_cursor(encode_cursor(key), column) == key


@pytest.mark.parametrize(
    ("column", "key"),
    [
        (ChatSession.id, 1),
        (ChatSession.id, True),
        (ChatSession.id, None),
        (ChatSession.id, "a\x00"),
        (Message.id, ["x"]),
        (StateVersion.version, "1"),
        (StateVersion.version, True),
        (StateVersion.version, False),
        (StateVersion.version, 1.0),
        (StateVersion.version, 2**31),
        (StateVersion.version, -(2**31) - 1),
        (ChatSession.last_seq, 2**63),
        (ChatSession.last_seq, -(2**63) - 1),
    ],
)
def test_keys_that_do_not_fit_the_column_are_refused(column: Any, key: Any) -> None:
    with pytest.raises(BadRequest, match="invalid cursor"):
        decode_cursor(forged(key), column)


@pytest.mark.parametrize("cursor", ["", "!!", "e30", forged(1)[:-2], "bnVsbA"])
def test_malformed_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(BadRequest, match="invalid cursor"):
        decode_cursor(cursor, StateVersion.version)
