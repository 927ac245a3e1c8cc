"""Which errors mean "a backing service could not be reached" (503
``unavailable``, a reply's patient retry) and which are faults (500)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from chathub.storage.db import backend_unreachable


class Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate


def dbapi(sqlstate: str | None = None, *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, Orig(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed"),
        TimeoutError(),
        PoolTimeout("QueuePool limit reached"),
        RedisConnectionError("Error 111 connecting"),
        dbapi(invalidated=True),
        dbapi("08006"),  # connection failure
        dbapi("57P01"),  # admin shutdown
        dbapi("57P03"),  # cannot connect now (starting up)
    ],
)
def test_unreachable(error: BaseException) -> None:
    assert backend_unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file", "blobs/ab/abcdef"),
        PermissionError(13, "Permission denied"),
        ValueError("bad"),
        dbapi("23505"),  # unique violation: a refusal, not an outage
        IntegrityError("INSERT", {}, Orig("23505")),
        dbapi("57014"),  # query cancelled (statement timeout): not class 57P
    ],
)
def test_faults_and_refusals_are_not(error: BaseException) -> None:
    assert not backend_unreachable(error)
