"""Keyset pagination with opaque cursors.

A cursor is the last returned sort key, base64url-encoded; a page is read
with ``key > cursor`` (or ``<`` when descending), so rows inserted or deleted
between pages never make a page repeat or skip a row that existed throughout.
A cursor is client input: its key must be of the key column's type (a string
without NUL for a string column; an integer, not a boolean, within the
column's range for an integer one), else it is ``400 invalid cursor``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

import orjson
from sqlalchemy import BigInteger, Integer, Select, SmallInteger, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from chathub.client_json import find_problem
from chathub.errors import BadRequest

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"k": key})).decode().rstrip("=")


def decode_cursor(cursor: str, key: InstrumentedAttribute[Any]) -> str | int:
    """The sort key in ``cursor``, checked to fit the ``key`` column."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
        value = data["k"]
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise BadRequest("invalid cursor") from exc
    if not _fits(value, key.type):
        raise BadRequest("invalid cursor")
    return value


# Subclasses before Integer, which they are.
_INTEGER_BITS = ((BigInteger, 64), (SmallInteger, 16), (Integer, 32))


def _fits(value: Any, column_type: Any) -> TypeGuard[str | int]:
    if isinstance(column_type, Integer):
        bits = next(n for kind, n in _INTEGER_BITS if isinstance(column_type, kind))
        # type() rather than isinstance: a bool is an int to Python, not to SQL.
        return type(value) is int and -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    if isinstance(column_type, String):
        return type(value) is str and find_problem(value) is None
    return False


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    key: InstrumentedAttribute[Any],
    *,
    limit: int,
    cursor: str | None,
    descending: bool = True,
) -> Page[Any]:
    """Run ``stmt`` (a select of one entity) ordered by the unique ``key``."""
    if cursor is not None:
        after = decode_cursor(cursor, key)
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(limit + 1)
    rows = list((await session.scalars(stmt)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(getattr(rows[-1], key.key)) if more and rows else None
    return Page(items=rows, next_cursor=next_cursor)
