"""The reply pipeline's cost per token, in process, without sockets.

    .venv/bin/python bench/pipeline_bench.py                     # -> pipeline_results.md, ~3 min
    .venv/bin/python bench/pipeline_bench.py --baseline 1378a2c  # and that commit, alternating
    .venv/bin/python bench/pipeline_bench.py --cases scripted-fast  # the first three rows only

Each case runs 50 replies at once, as in ``hub_bench.py``'s 50-session runs,
from one provider: through the reply pump's loop, then (but for the rows
"alone") the output guardrail and coalescer (``DeltaWriter``, the chat
mode's policy) into the in-memory session log, with no listener: no hub, no
socket, no database. The measuring process is pinned to core 0; CPU time per
token, median of the rounds.

Providers:

* ``scripted``: 2000 two-character chunks, at full speed (one turn of the
  event loop each) or paced at 250 chunks/s per reply.
* ``anthropic`` and ``openai``: the providers of production, through the
  official SDKs, against the test suite's fake Messages and chat-completions
  APIs (``tests/fakewire``), served by a process on core 1. A reply is 1000
  ``text_delta`` events (or chunks) of two characters, sent as fast as the
  fake server goes (``fast``: the client reads several per network read when
  it falls behind) or paced at 250 per second per reply (``paced``: as a model
  streams, about one event per read; what production pays).

What it is for: the hub benchmark's 50-session runs pay the scripted rows per
token before any frame is written; a server streaming from a real model pays
the SDK rows.

With ``--baseline REV`` every case also runs with chathub as committed at REV
(``git archive``, first on the measuring process's path), alternating with
the work tree, so that both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bare_ws_server import reply_text  # noqa: E402
from hub_bench import (  # noqa: E402
    PY,
    _cpu_model,
    _git,
    _kill,
    _kill_all,
    _on_signal,
    codes_to_measure,
)

REPLIES, CHUNK, PACE = 50, 2, 250.0
WIRE_TOKENS = 1000  # per reply of the fake APIs
MODES = {"alone": None, "coalescing off": 0.0, "coalescing 30 ms": 0.03}


@dataclass(frozen=True)
class Case:
    name: str
    provider: str  # scripted, anthropic, openai
    paced: bool
    tokens: int
    rounds: int
    modes: tuple[str, ...]


CASES = [
    Case("scripted-fast", "scripted", False, 2000, 7, tuple(MODES)),
    Case("anthropic-fast", "anthropic", False, WIRE_TOKENS, 5, ("alone", "coalescing 30 ms")),
    Case("openai-fast", "openai", False, WIRE_TOKENS, 5, ("alone", "coalescing 30 ms")),
    Case("scripted-paced", "scripted", True, WIRE_TOKENS, 3, ("alone",)),
    Case("anthropic-paced", "anthropic", True, WIRE_TOKENS, 3, ("alone",)),
    Case("openai-paced", "openai", True, WIRE_TOKENS, 3, ("alone",)),
]


# -- the fake provider APIs (a process on core 1) ---------------------------------


async def _wire_main(tokens: int, delay_s: float) -> None:
    sys.path.insert(0, str(REPO))
    from tests.fakewire.anthropic_server import TextReply, serve_anthropic
    from tests.fakewire.openai_server import ChatReply, serve_openai

    text = reply_text(tokens, CHUNK)
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    async with serve_anthropic() as anthropic_wire, serve_openai() as openai_wire:
        anthropic_wire.default = TextReply(chunks, delay_s=delay_s)
        openai_wire.default = ChatReply(chunks, delay_s=delay_s)
        print(json.dumps({"anthropic": anthropic_wire.base_url, "openai": openai_wire.base_url}))
        sys.stdout.flush()
        while True:  # the recorded requests would grow without bound
            await asyncio.sleep(1)
            anthropic_wire.requests.clear()
            openai_wire.requests.clear()


def wire_command(args: argparse.Namespace) -> int:
    import uvloop

    uvloop.run(_wire_main(args.tokens, args.delay_s))
    return 0


# -- one measurement (a process on core 0, chathub from its PYTHONPATH) ----------


async def _reply(provider: Any, log: Any, n: int, coalesce_s: float | None, text: str) -> None:
    from chathub.llm.base import ChatTurn, CompletionRequest, StreamEnd, TextDelta
    from chathub.llm.modes import get_mode, mode_policy
    from chathub.server.reply_stream import DeltaWriter

    request = CompletionRequest(turns=[ChatTurn("user", "hi")], max_tokens=len(text))
    events = provider.stream(request)
    if coalesce_s is None:  # the provider alone
        got = []
        async for event in events:
            if isinstance(event, TextDelta):
                got.append(event.text)
        if "".join(got) != text:
            raise AssertionError("the provider changed the text")
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
    if writer.text != text:
        raise AssertionError("the pipeline changed the text")


async def _tokens_per_turn(provider: Any, text: str) -> list[int]:
    """One more round of the providers alone, untimed: for each reply, how
    many tokens its stream handed over in each turn of the event loop that
    gave it any (a stream yields to the loop only when it waits)."""
    from chathub.llm.base import ChatTurn, CompletionRequest, TextDelta

    loop = asyncio.get_running_loop()
    turn, ticking = 0, True

    def tick() -> None:  # runs once per turn of the loop
        nonlocal turn
        turn += 1
        if ticking:
            loop.call_soon(tick)

    async def reply(runs: list[int]) -> None:
        request = CompletionRequest(turns=[ChatTurn("user", "hi")], max_tokens=len(text))
        last, run = -1, 0
        async for event in provider.stream(request):
            if isinstance(event, TextDelta):
                if turn != last:
                    if run:
                        runs.append(run)
                    last, run = turn, 0
                run += 1
        runs.append(run)

    runs: list[int] = []
    loop.call_soon(tick)
    try:
        await asyncio.gather(*(reply(runs) for _ in range(REPLIES)))
    finally:
        ticking = False
    return runs


async def _measure(
    url: str, tokens: int, coalesce_s: float | None, rounds: int
) -> tuple[list[float], list[int]]:
    from chathub.llm.factory import create_provider
    from chathub.server.session_log import MemorySessionLog

    text = reply_text(tokens, CHUNK)
    provider = create_provider(url)
    try:
        # untimed: connections, the SDK's lazy imports and first-use caches
        await asyncio.gather(
            *(_reply(provider, MemorySessionLog(), n, None, text) for n in range(4))
        )
        per_token = []
        for _ in range(rounds):
            log = MemorySessionLog()
            started = time.process_time()
            await asyncio.gather(
                *(_reply(provider, log, n, coalesce_s, text) for n in range(REPLIES))
            )
            per_token.append((time.process_time() - started) / (REPLIES * tokens) * 1e6)
        per_turn = await _tokens_per_turn(provider, text) if coalesce_s is None else []
        return per_token, per_turn
    finally:
        close = getattr(provider, "aclose", None)
        if close is not None:
            await close()


def measure_command(args: argparse.Namespace) -> int:
    import uvloop

    os.environ.setdefault("ANTHROPIC_API_KEY", "bench")
    os.environ.setdefault("OPENAI_API_KEY", "bench")
    import chathub

    # which chathub ran: the work tree or the baseline's export
    print(f"chathub from {Path(chathub.__file__).parent}", file=sys.stderr)
    per_token, per_turn = uvloop.run(_measure(args.url, args.tokens, MODES[args.mode], args.rounds))
    print(json.dumps({"per_token": per_token, "per_turn": per_turn}))
    return 0


# -- the whole benchmark ---------------------------------------------------------


def _start_wire(tokens: int, delay_s: float) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    wire = subprocess.Popen(
        ["taskset", "-c", "1", PY, __file__, "wire", "--tokens", str(tokens),
         "--delay-s", str(delay_s)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert wire.stdout is not None
    line = wire.stdout.readline()
    if not line:
        _kill(wire)
        raise RuntimeError("the fake provider APIs did not start")
    urls: dict[str, str] = json.loads(line)
    return wire, urls


def _url(case: Case, wires: dict[bool, dict[str, str]]) -> str:
    if case.provider == "scripted":
        rate = PACE if case.paced else 0
        text = reply_text(case.tokens, CHUNK).replace(" ", "+")
        return f"scripted://?text={text}&chunk={CHUNK}&rate={rate}"
    base = wires[case.paced][case.provider]
    model = "claude-bench" if case.provider == "anthropic" else "gpt-bench"
    return f"{case.provider}://{model}?base_url={base}"


def _run(case: Case, mode: str, url: str, src: str | None) -> tuple[list[float], list[int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        ["taskset", "-c", "0", PY, __file__, "measure", "--url", url, "--tokens",
         str(case.tokens), "--mode", mode, "--rounds", str(case.rounds)],
        env=env, capture_output=True, timeout=900, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{case.name} {mode} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result["per_token"], result["per_turn"]


def _versions() -> str:
    from importlib.metadata import version

    names = ("anthropic", "openai", "httpx2", "uvloop", "orjson")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except Exception:
            found.append(f"{name} not installed")
    return ", ".join(found)


def _turns_cell(runs: list[int]) -> str:
    total = sum(runs)
    seen = sum(r * r for r in runs) / total
    bursts = sum(r for r in runs if r >= 16) / total
    return f"{statistics.mean(runs):.1f} · {seen:.1f} · {bursts:.0%}"


def report(
    results: dict[tuple[str, str, str], list[float]],
    turns: dict[tuple[str, str], list[int]],
    cases: list[Case],
    codes: dict[str, str],
    command: str,
) -> str:
    lines = [
        "# chathub reply pipeline: CPU per token, in process",
        "",
        f"{REPLIES} replies at once per round; two-character tokens; the measuring "
        "process pinned to core 0, the fake provider APIs to core 1. CPU µs per "
        "token (user + system of the measuring process / tokens), median of the "
        "rounds, every round in brackets.",
        "",
        "| case | tokens per reply | mode | " + " | ".join(codes.values()) + " |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in codes) + " |",
    ]
    for case in cases:
        for mode in case.modes:
            cells = []
            for code in codes:
                rounds = results.get((case.name, mode, code))
                if rounds is None:
                    cells.append("")
                    continue
                each = " · ".join(f"{r:.1f}" for r in rounds)
                cells.append(f"**{statistics.median(rounds):.2f}** ({each})")
            lines.append(f"| {case.name} | {case.tokens} | {mode} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Tokens each reply's stream handed over per turn of the event loop, the provider "
        "alone, in one more untimed round of the 50 replies: the mean over the turns that gave "
        "a reply any; the mean as a token sees it (how many tokens came in its turn, "
        "averaged over the tokens); the share of tokens that came 16 or more to a turn "
        "(`hub_bench.py`'s default `--burst`). Timing decides it (whether the API got ahead "
        "of the reader), so it moves from run to run.",
        "",
        "| case | " + " | ".join(codes.values()) + " |",
        "| --- | " + " | ".join("---" for _ in codes) + " |",
    ]
    for case in cases:
        cells = []
        for code in codes:
            runs = turns.get((case.name, code))
            cells.append(_turns_cell(runs) if runs else "")
        if any(cells):
            lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    lines += [
        "",
        "- alone: the provider's events through the pump's loop, nothing done with them. "
        "coalescing off / 30 ms: the whole pipeline into the session log "
        "(guardrail, coalescer, log).",
        f"- paced: {PACE:.0f} tokens/s per reply (the scripted provider's `rate`, the fake "
        "APIs' pause before each event); fast: as fast as each goes.",
        "",
        "## Machine",
        "",
        f"- nproc: {os.cpu_count()} ({_cpu_model()}), {os.uname().sysname} {os.uname().release}",
        f"- Python {sys.version.split()[0]}; {_versions()}",
        f"- code measured: {', '.join(codes.values())} (HEAD {head})",
        "",
        "## Command",
        "",
        "```sh",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two cores (measuring on core 0, fake APIs on core 1)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    cases = [c for c in CASES if c.name in args.cases] if args.cases else CASES
    results: dict[tuple[str, str, str], list[float]] = {}
    turns: dict[tuple[str, str], list[int]] = {}
    wires: dict[bool, dict[str, str]] = {}
    procs = []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-src-") as src_dir:
        try:
            codes, sources = codes_to_measure(args.baseline, src_dir)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            for paced in sorted({c.paced for c in cases if c.provider != "scripted"}):
                wire, wires[paced] = _start_wire(WIRE_TOKENS, 1 / PACE if paced else 0.0)
                procs.append(wire)
            for case in cases:
                url = _url(case, wires)
                for mode in case.modes:
                    for code in codes:
                        rounds, per_turn = _run(case, mode, url, sources[code])
                        results[(case.name, mode, code)] = rounds
                        if per_turn:
                            turns[(case.name, code)] = per_turn
                        print(
                            f"{case.name:16s} {mode:17s} {codes[code]}: "
                            f"{statistics.median(rounds):7.2f} µs/token",
                            file=sys.stderr,
                        )
        finally:
            for proc in procs:
                _kill(proc, grace=2)
            _kill_all()
    command = "python bench/pipeline_bench.py " + " ".join(sys.argv[1:])
    text = report(results, turns, cases, codes, command)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES])
    parser.add_argument("--baseline", metavar="REV", help="also measure this commit, alternating")
    parser.add_argument(
        "--output", default=str(HERE / "pipeline_results.md"), help="'' to not write"
    )
    sub = parser.add_subparsers(dest="command")
    wire = sub.add_parser("wire", help="(internal) the fake provider APIs")
    wire.add_argument("--tokens", type=int, required=True)
    wire.add_argument("--delay-s", type=float, default=0.0)
    measure = sub.add_parser("measure", help="(internal) one case in this process")
    measure.add_argument("--url", required=True)
    measure.add_argument("--tokens", type=int, required=True)
    measure.add_argument("--mode", choices=list(MODES), required=True)
    measure.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "wire":
        return wire_command(args)
    if args.command == "measure":
        return measure_command(args)
    return bench_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
