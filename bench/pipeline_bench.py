"""The reply pipeline's cost per token, in process, without sockets.

    .venv/bin/python bench/pipeline_bench.py   # printed; ~10 s

50 replies at once, as in ``hub_bench.py``'s 50-session runs: each the
scripted provider at full speed (2000 two-character chunks, one turn of the
event loop each), through the reply pump's loop, the output guardrail and
coalescer (``DeltaWriter``, the chat mode's policy) into the in-memory
session log, with no listener: no hub, no socket, no database. Pinned to one
core; CPU time per token, median of 7 rounds, for the provider alone and for
the whole pipeline with coalescing off and at 30 ms.

What it is for: the hub benchmark's 50-session runs pay this per token before
any frame is written, so it bounds what they can reach.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bare_ws_server import reply_text  # noqa: E402

from chathub.llm.base import ChatTurn, CompletionRequest, StreamEnd, TextDelta  # noqa: E402
from chathub.llm.modes import get_mode, mode_policy  # noqa: E402
from chathub.llm.scripted import ScriptedProvider  # noqa: E402
from chathub.server.reply_stream import DeltaWriter  # noqa: E402
from chathub.server.session_log import MemorySessionLog  # noqa: E402

REPLIES, TOKENS, CHUNK, ROUNDS = 50, 2000, 2, 7
TEXT = reply_text(TOKENS, CHUNK)
REQUEST = CompletionRequest(turns=[ChatTurn("user", "hi")], max_tokens=TOKENS * CHUNK)


async def _reply(
    provider: ScriptedProvider, log: MemorySessionLog, n: int, coalesce_s: float | None
) -> None:
    events = provider.stream(REQUEST)
    if coalesce_s is None:  # the provider alone
        async for _ in events:
            pass
        return
    chat = get_mode("chat")
    assert chat is not None
    writer = DeltaWriter(
        log=log,
        session_id=f"s{n}",
        reply_id=f"r{n}",
        policy=mode_policy(chat),
        holdback_chars=128,
        holdback_ms=250,
        coalesce_s=coalesce_s,
        coalesce_chars=512,
    )
    async for event in events:  # as Replies._pump
        if isinstance(event, StreamEnd) or not isinstance(event, TextDelta) or not event.text:
            continue
        if writer.take(event.text):
            await writer.write_due()
    await writer.finish()
    if writer.text != TEXT:
        raise AssertionError("the pipeline changed the text")


async def _round(coalesce_s: float | None) -> float:
    provider = ScriptedProvider(text=TEXT, chunk=CHUNK)
    log = MemorySessionLog()
    started = time.process_time()
    await asyncio.gather(*(_reply(provider, log, n, coalesce_s) for n in range(REPLIES)))
    return (time.process_time() - started) / (REPLIES * TOKENS) * 1e6


def main() -> int:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    print(f"{REPLIES} replies x {TOKENS} tokens of {CHUNK} characters, CPU µs per token:")
    for label, coalesce_s in (
        ("scripted provider alone", None),
        ("pipeline, coalescing off", 0.0),
        ("pipeline, coalescing 30 ms", 0.03),
    ):
        rounds = [uvloop.run(_round(coalesce_s)) for _ in range(ROUNDS)]
        print(f"  {label:28s} {statistics.median(rounds):5.2f}  (min {min(rounds):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
