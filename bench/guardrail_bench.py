"""Cost and added delay of the streaming output guardrail (HoldbackFilter).

    python bench/guardrail_bench.py [--tokens N] [--seed S]

A reply is simulated as a stream of ~4-character tokens of English prose, with
PII (e-mails, phones, cards, IBANs, API keys) sprinkled in: rarely in the
"prose" stream, in most sentences in the "PII-dense" one. For each stream the
filter (default policy, hold-back 128 characters / 250 ms) is fed token by
token at a simulated 100 tokens/s, and compared with no filter at all. Each
is run three times and the run with the lowest mean cost is reported.

- cost per token: wall time of one ``feed`` call, in microseconds;
- added delay per character: from the token that brought a character to the
  token after which it has left the filter (sent, or covered by a replacement
  that was sent), in tokens and in ms at 100 tokens/s. Characters a
  replacement covers count as leaving when the replacement is sent.

Prints a markdown table and writes it to bench/guardrail_results.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chathub.llm.guardrails import HoldbackFilter, Policy

TOKENS_PER_SECOND = 100.0
HOLDBACK_CHARS = 128
HOLDBACK_MS = 250.0
REPEATS = 3

WORDS: tuple[str, ...] = tuple(
    word
    for line in (
        "the a of to and in that is for it as with was on be by this are or at from have an ",
        "team plan project release week report customer issue update meeting review design ",
        "service data model reply stream token user message server latency budget schedule ",
        "migration database deploy backend frontend test result change decision question ",
        "because however therefore although while since before after during between about ",
        "clearly quickly carefully probably usually already still only also just even more ",
        "we you they should would could might will can need want expect think suggest agree ",
        "improve reduce increase measure monitor ensure support handle finish start continue",
    )
    for word in line.split()
)

PII = (
    "jane.doe@example.com",
    "ops-team+alerts@mail.example.co.uk",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "4111 1111 1111 1111",
    "GB82 WEST 1234 5698 7654 32",
    "sk-proj-4f9QmZ2xLp8RtY6wVb3NcK1sJ7hG5dFa",
    "AKIAIOSFODNN7EXAMPLE",
    "api_key=x9Fq2LmZ8rTb4WcY7nKp",
)


def make_text(rng: random.Random, sentences: int, pii_rate: float) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        if rng.random() < pii_rate:
            words.insert(rng.randint(1, len(words)), rng.choice(PII))
        if rng.random() < 0.15:
            words.insert(rng.randint(1, len(words)), str(rng.randint(2, 9999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!"))
    return " ".join(out)


def tokenize(text: str, rng: random.Random) -> list[str]:
    """BPE-like pieces: a leading space sticks to the next word, words split
    into pieces of at most 3..7 characters (about 4 on average)."""
    tokens: list[str] = []
    for k, word in enumerate(text.split(" ")):
        piece = word if k == 0 else " " + word
        while piece:
            n = min(len(piece), rng.choice((3, 4, 5, 6, 7)))
            tokens.append(piece[:n])
            piece = piece[n:]
    return tokens


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_filter(tokens: list[str], policy: Policy) -> tuple[list[float], list[int], int]:
    """Per-token cost (µs), per-character delay (tokens), output length."""
    f = HoldbackFilter(policy, holdback_chars=HOLDBACK_CHARS, holdback_ms=HOLDBACK_MS)
    costs: list[float] = []
    left: list[int] = []  # after token t: how many input characters have left
    fed = 0
    out_len = 0
    clock = time.perf_counter_ns
    for t, tok in enumerate(tokens):
        start = clock()
        out = f.feed(tok, t / TOKENS_PER_SECOND)
        costs.append((clock() - start) / 1000.0)
        fed += len(tok)
        out_len += len(out.text)
        left.append(fed - f.held)
    out_len += len(f.flush(len(tokens) / TOKENS_PER_SECOND).text)
    left.append(fed)
    return costs, char_delays(tokens, left), out_len


def run_passthrough(tokens: list[str]) -> tuple[list[float], list[int], int]:
    send: Callable[[str], str] = str  # what the reply task does without a filter
    costs: list[float] = []
    out_len = 0
    clock = time.perf_counter_ns
    for tok in tokens:
        start = clock()
        out_len += len(send(tok))
        costs.append((clock() - start) / 1000.0)
    left = []
    fed = 0
    for tok in tokens:
        fed += len(tok)
        left.append(fed)
    left.append(fed)
    return costs, char_delays(tokens, left), out_len


def char_delays(tokens: list[str], left: list[int]) -> list[int]:
    """For each input character: tokens between arrival and its final leaving.
    ``left[t]`` is the count of characters out after token t (the last entry
    is after flush). A character counts as out from the first token after
    which it stays out (a committed match's tail may come back into the held
    text once the match ends)."""
    stays_out = len(left) - 1
    out_from = [0] * len(left)
    floor = left[-1]
    for t in range(len(left) - 1, -1, -1):
        floor = min(floor, left[t])
        out_from[t] = floor  # characters [0, floor) are out from token t on
    delays: list[int] = []
    arrived = 0
    t_out = 0
    for t, tok in enumerate(tokens):
        for i in range(arrived, arrived + len(tok)):
            while t_out < stays_out and out_from[t_out] <= i:
                t_out += 1
            delays.append(max(0, t_out - t))
        arrived += len(tok)
    return delays


def measure(name: str, tokens: list[str], policy: Policy) -> list[list[str]]:
    rows = []
    runs: tuple[tuple[str, Callable[[], tuple[list[float], list[int], int]]], ...] = (
        ("off", functools.partial(run_passthrough, tokens)),
        ("on", functools.partial(run_filter, tokens, policy)),
    )
    for label, fn in runs:
        fn()  # warm up: regex caches, allocator
        # best of a few runs: the machine may be busy with other work
        best: tuple[list[float], list[int], int] | None = None
        for _ in range(REPEATS):
            gc.disable()
            try:
                run = fn()
            finally:
                gc.enable()
            if best is None or statistics.fmean(run[0]) < statistics.fmean(best[0]):
                best = run
        assert best is not None
        costs, delays, _ = best
        ms = 1000.0 / TOKENS_PER_SECOND
        rows.append(
            [
                name,
                label,
                f"{len(tokens)}",
                f"{statistics.fmean(costs):.2f}",
                f"{percentile(costs, 0.50):.2f}",
                f"{percentile(costs, 0.99):.2f}",
                f"{percentile(delays, 0.50):.0f}",
                f"{percentile(delays, 0.99):.0f}",
                f"{max(delays)}",
                f"{percentile(delays, 0.50) * ms:.0f}",
                f"{percentile(delays, 0.99) * ms:.0f}",
                f"{max(delays) * ms:.0f}",
            ]
        )
    return rows


HEADER = [
    "stream",
    "filter",
    "tokens",
    "µs/token mean",
    "µs/token p50",
    "µs/token p99",
    "delay p50 (tokens)",
    "delay p99 (tokens)",
    "delay max (tokens)",
    "delay p50 (ms)",
    "delay p99 (ms)",
    "delay max (ms)",
]


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens per stream (about)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    policy = Policy.default()
    streams = []
    for name, rate in (("prose, occasional PII", 0.05), ("PII-dense", 0.8)):
        tokens: list[str] = []
        while len(tokens) < args.tokens:
            tokens += tokenize(make_text(rng, 50, rate), rng)
        streams.append((name, tokens[: args.tokens]))
    rows = [row for name, tokens in streams for row in measure(name, tokens, policy)]
    on = [r for r in rows if r[1] == "on"]
    worst_cost = max(float(r[3]) for r in on)
    worst_delay = max(float(r[11]) for r in on)
    verdict = (
        f"Target: mean cost under 20 µs/token ({'met' if worst_cost < 20 else 'MISSED'}, "
        f"worst stream {worst_cost:.2f} µs); added delay within the {HOLDBACK_MS:.0f} ms "
        f"hold-back window ({'met' if worst_delay <= HOLDBACK_MS else 'MISSED'}, "
        f"longest {worst_delay:.0f} ms)."
    )
    mean_chars = statistics.fmean(len(t) for _, toks in streams for t in toks)
    notes = (
        f"Default policy; hold-back window {HOLDBACK_CHARS} characters / {HOLDBACK_MS:.0f} ms; "
        f"{TOKENS_PER_SECOND:.0f} tokens/s simulated; {mean_chars:.1f} characters per token. "
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"`python bench/guardrail_bench.py --tokens {args.tokens} --seed {args.seed}`."
    )
    report = "\n".join(
        [
            "# HoldbackFilter benchmark",
            "",
            notes,
            "",
            table(rows),
            "",
            verdict,
            "",
            "Delay: from the token that brought a character to the token after which it has",
            "left the filter (sent, or covered by a replacement already sent); 0 = same token.",
            "",
        ]
    )
    print(report)
    Path(__file__).with_name("guardrail_results.md").write_text(report)


if __name__ == "__main__":
    main()
