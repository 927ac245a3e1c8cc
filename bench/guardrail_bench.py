"""Cost and added delay of the streaming output guardrail (HoldbackFilter).

    python bench/guardrail_bench.py [--tokens N] [--seed S] [--chunk bpe|N ...]
                                    [--rev REV] [--out PATH|-]

A reply is simulated as a stream of tokens of English prose, with PII
(e-mails, phones, cards, IBANs, API keys) sprinkled in: rarely in the "prose"
stream, in most sentences in the "PII-dense" one. ``--chunk`` says how the
text is cut into tokens, once per value given (default: both): ``bpe`` is
BPE-like pieces of about 4 characters (a leading space sticks to the next
word, words split into pieces of 3..7 characters); a number ``N`` is pieces
of exactly N characters (``2``: what the server profile streamed). For each
stream the filter (default policy, hold-back 128 characters / 250 ms) is fed
token by token at a simulated 100 tokens/s, and compared with no filter at
all. Each is run three times and the run with the lowest mean cost is
reported; the filter's output is checked against ``redact_all`` of the
whole text.

``--rev REV`` measures chathub as committed at REV (``git archive REV
chathub`` into a temporary folder, put first on the path), not the work tree:
the "before" figures for a change. It prints the table without writing the
results file unless ``--out`` says where.

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
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if "--rev" in sys.argv[1:-1]:
    # Run this script again with chathub as committed at that revision first on
    # the path (the work tree may hold unfinished edits); reads the repository
    # only.
    _repo = Path(__file__).resolve().parent.parent
    _at = sys.argv.index("--rev")
    _rev = sys.argv[_at + 1]
    _argv = sys.argv[1:_at] + sys.argv[_at + 2 :]
    with tempfile.TemporaryDirectory(prefix="guardrail-rev-") as _src:
        _archive = subprocess.run(
            ["git", "-C", str(_repo), "archive", _rev, "chathub"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        subprocess.run(["tar", "-x", "-C", _src], input=_archive.stdout, check=True, timeout=60)
        _env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [_src, os.environ.get("PYTHONPATH")])),
        )
        _env["GUARDRAIL_BENCH_REV"] = _rev
        if "--out" not in _argv:
            _argv += ["--out", "-"]
        sys.exit(
            subprocess.run([sys.executable, __file__, *_argv], env=_env, check=False).returncode
        )

from chathub.llm.guardrails import HoldbackFilter, Policy, redact_all

TOKENS_PER_SECOND = 100.0
HOLDBACK_CHARS = 128
MEAN_US = 20.0  # target: mean cost per token
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


def fixed_pieces(text: str, size: int) -> list[str]:
    """Pieces of exactly ``size`` characters (the last may be shorter)."""
    return [text[k : k + size] for k in range(0, len(text), size)]


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


Run = tuple[list[float], list[int], str]


def run_filter(tokens: list[str], policy: Policy) -> Run:
    """Per-token cost (µs), per-character delay (tokens), output."""
    f = HoldbackFilter(policy, holdback_chars=HOLDBACK_CHARS, holdback_ms=HOLDBACK_MS)
    costs: list[float] = []
    left: list[int] = []  # after token t: how many input characters have left
    fed = 0
    out: list[str] = []
    clock = time.perf_counter_ns
    for t, tok in enumerate(tokens):
        start = clock()
        released = f.feed(tok, t / TOKENS_PER_SECOND)
        costs.append((clock() - start) / 1000.0)
        fed += len(tok)
        out.append(released.text)
        left.append(fed - f.held)
    out.append(f.flush(len(tokens) / TOKENS_PER_SECOND).text)
    left.append(fed)
    return costs, char_delays(tokens, left), "".join(out)


def run_passthrough(tokens: list[str]) -> Run:
    send: Callable[[str], str] = str  # what the reply task does without a filter
    costs: list[float] = []
    out: list[str] = []
    clock = time.perf_counter_ns
    for tok in tokens:
        start = clock()
        out.append(send(tok))
        costs.append((clock() - start) / 1000.0)
    left = []
    fed = 0
    for tok in tokens:
        fed += len(tok)
        left.append(fed)
    left.append(fed)
    return costs, char_delays(tokens, left), "".join(out)


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


def measure(name: str, chunk: str, tokens: list[str], policy: Policy) -> list[list[str]]:
    rows = []
    expected = redact_all("".join(tokens), policy).text
    runs: tuple[tuple[str, Callable[[], Run]], ...] = (
        ("off", functools.partial(run_passthrough, tokens)),
        ("on", functools.partial(run_filter, tokens, policy)),
    )
    for label, fn in runs:
        fn()  # warm up: regex caches, allocator
        # best of a few runs: the machine may be busy with other work
        best: Run | None = None
        for _ in range(REPEATS):
            gc.disable()
            try:
                run = fn()
            finally:
                gc.enable()
            if best is None or statistics.fmean(run[0]) < statistics.fmean(best[0]):
                best = run
        assert best is not None
        costs, delays, output = best
        if label == "on" and output != expected:
            raise SystemExit(f"{name}, {chunk}: the filter's output differs from redact_all")
        ms = 1000.0 / TOKENS_PER_SECOND
        rows.append(
            [
                name,
                chunk,
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
    "tokens of",
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
    parser.add_argument(
        "--chunk",
        nargs="+",
        default=["bpe", "2"],
        help="token shapes: bpe (~4 characters, BPE-like) and/or N (exactly N characters)",
    )
    parser.add_argument("--rev", help="measure chathub as committed at this git revision")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).with_name("guardrail_results.md")),
        help="where to write the report ('-': print only)",
    )
    args = parser.parse_args()
    for chunk in args.chunk:
        if chunk != "bpe" and not (chunk.isdigit() and int(chunk) > 0):
            parser.error(f"--chunk: bpe or a positive number, not {chunk!r}")
    policy = Policy.default()
    streams = []
    for chunk in args.chunk:
        rng = random.Random(args.seed)  # the same text for every chunking
        for name, rate in (("prose, occasional PII", 0.05), ("PII-dense", 0.8)):
            tokens: list[str] = []
            while len(tokens) < args.tokens:
                text = make_text(rng, 50, rate)
                if tokens:
                    text = " " + text
                if chunk == "bpe":
                    tokens += tokenize(text, rng)
                else:
                    tokens += fixed_pieces(text, int(chunk))
            label = "bpe (~4 chars)" if chunk == "bpe" else f"{chunk} chars"
            streams.append((name, label, tokens[: args.tokens]))
    rows = [row for name, chunk, toks in streams for row in measure(name, chunk, toks, policy)]
    on = [r for r in rows if r[2] == "on"]
    worst_cost = max(float(r[4]) for r in on)
    worst_delay = max(float(r[12]) for r in on)
    verdict = (
        f"Targets: on every stream, mean cost under {MEAN_US:.0f} µs/token "
        f"({'met' if worst_cost < MEAN_US else 'MISSED'}, worst {worst_cost:.2f} µs) and added "
        f"delay within the {HOLDBACK_MS:.0f} ms hold-back window "
        f"({'met' if worst_delay <= HOLDBACK_MS else 'MISSED'}, longest {worst_delay:.0f} ms)."
    )
    bpe = [len(t) for _, chunk, toks in streams if chunk.startswith("bpe") for t in toks]
    mean_chars = f" (bpe: {statistics.fmean(bpe):.1f} characters per token)" if bpe else ""
    rev = os.environ.get("GUARDRAIL_BENCH_REV")
    code = f"chathub as committed at `{rev}` (`--rev`)" if rev else "chathub work tree"
    notes = (
        f"Default policy; hold-back window {HOLDBACK_CHARS} characters / {HOLDBACK_MS:.0f} ms; "
        f"{TOKENS_PER_SECOND:.0f} tokens/s simulated{mean_chars}; output checked against "
        f"`redact_all`. {code}, Python {platform.python_version()} on {platform.machine()}, "
        f"`python bench/guardrail_bench.py --tokens {args.tokens} --seed {args.seed} "
        f"--chunk {' '.join(args.chunk)}`."
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
    if args.out != "-":
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
