"""The debounce behind extraction and the dashboard summary: one run per
burst of calls, one run per key at a time, a call during a run runs again."""

from __future__ import annotations

import asyncio

from chathub.server.extraction import Debounced


async def test_a_burst_gives_one_run_per_key_and_a_call_during_a_run_one_more() -> None:
    runs: list[str] = []
    release = asyncio.Event()

    async def run(key: str) -> None:
        runs.append(key)
        await release.wait()

    debounced = Debounced(0.02, run)
    for _ in range(5):
        debounced.schedule("a")
    debounced.schedule("b")
    await asyncio.sleep(0.1)
    assert sorted(runs) == ["a", "b"] and not debounced.idle
    debounced.schedule("a")  # while "a" runs: once more, after it
    await asyncio.sleep(0.1)
    assert sorted(runs) == ["a", "b"]
    release.set()
    for _ in range(100):
        if debounced.idle:
            break
        await asyncio.sleep(0.01)
    assert sorted(runs) == ["a", "a", "b"] and debounced.idle


async def test_close_cancels_what_is_waiting_and_running() -> None:
    started = asyncio.Event()

    async def run(_key: str) -> None:
        started.set()
        await asyncio.sleep(60)

    debounced = Debounced(0.01, run)
    debounced.schedule("a")
    await asyncio.wait_for(started.wait(), 5)
    debounced.schedule("b")
    await debounced.close()
    assert debounced.idle
    debounced.schedule("c")  # closed: ignored
    assert debounced.idle
