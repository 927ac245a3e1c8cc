"""Identifiers: UUIDv7 strings, time-ordered and monotonic within a process,
so that ordering by id is ordering by creation."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = 0


def new_id() -> str:
    """A UUIDv7 (RFC 9562) whose 74 low bits are random but strictly
    increasing within this process."""
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        rand = int.from_bytes(os.urandom(10), "big") >> 6  # 74 bits
        candidate = (ms << 74) | rand
        if candidate <= _last:
            candidate = _last + 1
        _last = candidate
    ms, rand = candidate >> 74, candidate & ((1 << 74) - 1)
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))
