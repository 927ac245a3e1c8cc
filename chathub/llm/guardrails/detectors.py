"""PII and secret detectors: compiled patterns, their validators, and the shape
of a pattern's beginning. Pure: no I/O, nothing but text in and spans out.

Each :class:`Detector` knows, about its rule:

- ``pattern`` + ``validate``: what a match is (a regex, then Luhn, mod-97,
  entropy or a digit count on the matched text);
- ``tail`` (+ ``refine``): what a *possible beginning* of a match looks like
  when it runs into the end of the text seen so far. A streaming filter must
  hold such a tail back, because the next characters may complete it. It is
  a superset: everything that could still become or extend a match,
  including whatever a pattern's look-ahead still has to read;
- ``commit``: whether a match found at the end of the text is already
  certain, so that more text can only make it longer (e-mails, prefixed
  keys, private-key blocks): its replacement can then be sent early;
- ``evidence``: whether an unfinished candidate already shows the rule's
  tell-tale part (the ``@`` of an e-mail, a dozen card digits, a key
  prefix). Only such a candidate may be redacted early when the hold-back
  limits run out.

Patterns read at most two characters behind a match and the text the ``tail``
covers ahead of it; a match that starts before the earliest open tail can
therefore no longer change, whatever follows. That property is what lets
:mod:`~chathub.llm.guardrails.holdback` release text early and still produce
exactly the same result as a scan of the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from chathub.llm.guardrails.validators import (
    card_span,
    iban_span,
    looks_secret,
    phone_span,
    secret_span,
)

#: Rule names, as reported in findings, policies, events and metrics.
RULES: tuple[str, ...] = (
    "email",
    "phone",
    "card",
    "iban",
    "api_key",
    "private_key",
    "blocklist",
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected span of ``text``: ``text[span[0]:span[1]]``."""

    rule: str
    span: tuple[int, int]
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A validated match. ``text[start:redact_start]`` stays visible (the label
    in ``api_key=…``); ``text[redact_start:end]`` is what the rule covers."""

    detector: Detector
    start: int
    redact_start: int
    end: int


#: From a regex match to ``(redact_start, end)``, or None when the match is not
#: a real instance of the rule (Luhn fails, mod-97 fails, low entropy, ...).
Validator = Callable[[re.Match[str]], "tuple[int, int] | None"]
#: Whether the candidate starting at ``i`` is really still open, once ``tail``
#: has matched ``text[i:endpos]``.
Refiner = Callable[[str, int, int], bool]
#: Whether a valid match at the open end of the text stays a valid match with
#: the same start whatever follows (only its end may grow).
Committer = Callable[[re.Match[str]], bool]


def _whole(m: re.Match[str]) -> tuple[int, int] | None:
    return m.start(), m.end()


@dataclass(frozen=True, eq=False)
class Detector:
    rule: str
    pattern: re.Pattern[str]
    tail: re.Pattern[str]
    validate: Validator = _whole
    evidence: re.Pattern[str] | None = None
    refine: Refiner | None = None
    commit: Committer | None = None

    def match_at(self, text: str, pos: int) -> Hit | None:
        """The valid match starting exactly at ``pos``, if any."""
        m = self.pattern.match(text, pos)
        if m is None:
            return None
        span = self.validate(m)
        return None if span is None else Hit(self, pos, span[0], span[1])

    def find(self, text: str, pos: int) -> Hit | None:
        """The leftmost valid match starting at or after ``pos``."""
        while True:
            m = self.pattern.search(text, pos)
            if m is None:
                return None
            span = self.validate(m)
            if span is not None:
                return Hit(self, m.start(), span[0], span[1])
            pos = m.start() + 1

    def open_at(self, text: str, i: int, endpos: int | None = None) -> bool:
        """Whether ``text[i:endpos]`` may still grow into (or extend) a match."""
        end = len(text) if endpos is None else endpos
        if self.tail.match(text, i, end) is None:
            return False
        return self.refine is None or self.refine(text, i, end)

    def evidence_at(self, text: str, i: int) -> re.Match[str] | None:
        """The candidate at ``i`` already shows this rule's tell-tale part."""
        return None if self.evidence is None else self.evidence.match(text, i)

    def committable(self, text: str, hit: Hit) -> bool:
        if self.commit is None:
            return False
        m = self.pattern.match(text, hit.start)
        return m is not None and self.commit(m)


# -- regex building helpers -------------------------------------------------------


def _nested(tokens: Sequence[str], rest: str = "") -> str:
    """A regex for any non-empty prefix of the token sequence (each token is
    already a regex); ``rest`` may follow the complete sequence."""
    out = rest
    for tok in reversed(tokens[1:]):
        out = f"(?:{tok}{out})?"
    return tokens[0] + out


def _lit(literal: str, rest: str = "") -> str:
    """Any non-empty prefix of ``literal``; ``rest`` after all of it."""
    return _nested([re.escape(ch) for ch in literal], f"(?:{rest})?" if rest else "")


_Trie = dict[str, "_Trie"]


def _trie(words: Iterable[Sequence[str]], start_guard: Callable[[str], str]) -> str:
    """Any non-empty prefix of any of the token sequences, as one regex; the
    first token of each branch is preceded by ``start_guard(token)``."""
    root: _Trie = {}
    for toks in words:
        node = root
        for tok in toks:
            node = node.setdefault(tok, {})

    def emit(node: _Trie, top: bool) -> str:
        alts = []
        for tok, child in node.items():
            guard = start_guard(tok) if top else ""
            alts.append(f"{guard}{tok}(?:{emit(child, False)})?" if child else f"{guard}{tok}")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(root, True) if root else "(?!)"


# -- the built-in detectors -------------------------------------------------------

_EMAIL_LOCAL = r"[A-Za-z0-9._%+\-]"
_EMAIL_PATTERN = re.compile(
    rf"(?<!{_EMAIL_LOCAL}){_EMAIL_LOCAL}{{1,64}}@"
    # the first "x.tld" must come within 67 characters of the "@", so that a
    # candidate without one can be given up on after a bounded wait
    r"(?=[A-Za-z0-9.\-]{0,63}[A-Za-z0-9\-]\.[A-Za-z]{2})"
    r"[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_EMAIL_TAIL = re.compile(rf"(?<!{_EMAIL_LOCAL}){_EMAIL_LOCAL}{{1,64}}(?:@[A-Za-z0-9.\-]*)?\Z")
_EMAIL_LOOKAHEAD = 67


def _email_open(text: str, i: int, endpos: int) -> bool:
    # the tail matched text[i:endpos]: a local part, maybe "@" and a domain
    at = text.find("@", i, endpos)
    if at < 0 or endpos - at - 1 <= _EMAIL_LOOKAHEAD:
        return True
    # past the look-ahead window: open only while a match exists and may grow
    return _EMAIL_PATTERN.match(text, i, endpos) is not None


EMAIL = Detector(
    "email",
    _EMAIL_PATTERN,
    _EMAIL_TAIL,
    evidence=re.compile(rf"{_EMAIL_LOCAL}{{1,64}}@[A-Za-z0-9\-]"),
    refine=_email_open,
    commit=lambda m: True,  # no right-hand look-ahead: more text only extends it
)

_NUM_START = r"(?<![A-Za-z0-9_+])(?<![0-9][ .\-])"
PHONE = Detector(
    "phone",
    re.compile(
        _NUM_START + r"(?:"
        r"\+[0-9]{7,15}"
        r"|\+[0-9]{1,3}(?:[ .\-]?\([0-9]{1,4}\))?[ .\-]?[0-9]{1,5}(?:[ .\-][0-9]{1,5}){0,5}"
        r"|\([0-9]{2,5}\)[ .\-]?[0-9]{2,5}(?:[ .\-][0-9]{2,5}){0,3}"
        r"|[0-9]{2,5}(?:[ .\-][0-9]{2,5}){1,4}"
        r")(?![A-Za-z0-9_])"
    ),
    re.compile(_NUM_START + r"[+(0-9](?:[0-9()]|[ .\-](?![ .\-])){0,48}\Z"),
    validate=phone_span,
    # a dated 2024-01-15 or an amount 123 456 789 is no evidence; ten digits are
    evidence=re.compile(
        r"\+[0-9](?:[ .\-()]{0,2}[0-9]){6}|\([0-9]{2,5}\)[ .\-]?[0-9]{3}"
        r"|(?=[0-9]{2,5}[ .\-][0-9])[0-9](?:[ .\-]?[0-9]){9}"
    ),
)

_CARD_START = r"(?<![A-Za-z0-9_])(?<![0-9][ \-])"
CARD = Detector(
    "card",
    re.compile(_CARD_START + r"[0-9](?:[ \-]?[0-9]){12,18}(?![A-Za-z0-9_])"),
    re.compile(_CARD_START + r"[0-9](?:[ \-]?[0-9]){0,18}[ \-]?\Z"),
    validate=card_span,
    evidence=re.compile(r"[0-9](?:[ \-]?[0-9]){11}"),
)

_WORD_START = r"(?<![A-Za-z0-9_])"
IBAN = Detector(
    "iban",
    re.compile(_WORD_START + r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9_])"),
    re.compile(
        _WORD_START + r"(?:[A-Z]{1,2}|[A-Z]{2}[0-9]{1,2}|[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){0,30} ?)\Z"
    ),
    validate=iban_span,
    evidence=re.compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){8}"),
)

_TOKEN_START = r"(?<![A-Za-z0-9_\-])"


def _prefixed_key(prefix_tail: str, pattern: str, evidence: str) -> Detector:
    """A key with a fixed prefix and an open-ended body: once it matches, more
    body characters only make it longer, so it can be committed early."""
    return Detector(
        "api_key",
        re.compile(_TOKEN_START + pattern),
        re.compile(_TOKEN_START + f"(?:{prefix_tail})" + r"\Z"),
        evidence=re.compile(evidence),
        commit=lambda m: True,
    )


_B64 = r"[A-Za-z0-9_\-]"
CHATHUB_KEY = _prefixed_key(
    _lit("chk_", r"[0-9a-f]{0,8}(?:_" + _B64 + "*)?"),
    r"chk_[0-9a-f]{8}_" + _B64 + "{20,}",
    r"chk_[0-9a-f]{4}",
)
SK_KEY = _prefixed_key(_lit("sk-", _B64 + "*"), r"sk-" + _B64 + "{20,}", r"sk-" + _B64 + "{8}")
GITHUB_TOKEN = _prefixed_key(
    _lit("gh") + r"|gh[pousr](?:_[A-Za-z0-9]*)?|" + _lit("github_pat_", r"[A-Za-z0-9_]*"),
    r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    r"(?:gh[pousr]_[A-Za-z0-9]{8}|github_pat_[A-Za-z0-9_]{4})",
)
SLACK_TOKEN = _prefixed_key(
    _lit("xox") + r"|xox[abposr](?:-[A-Za-z0-9\-]*)?",
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    r"xox[abposr]-[A-Za-z0-9\-]{4}",
)
AWS_KEY = Detector(
    "api_key",
    re.compile(r"(?<![A-Za-z0-9])A[KS]IA[0-9A-Z]{16}(?![0-9A-Za-z])"),
    re.compile(r"(?<![A-Za-z0-9])A(?:[KS](?:I(?:A[0-9A-Z]{0,16})?)?)?\Z"),
    evidence=re.compile(r"A[KS]IA[0-9A-Z]{4}"),
)

_LABELS = sorted(
    {
        f"{a}{sep}{b}"
        for a, b in (
            ("api", "key"),
            ("api", "token"),
            ("access", "key"),
            ("access", "token"),
            ("auth", "token"),
            ("client", "secret"),
            ("secret", "key"),
        )
        for sep in ("_", "-", "")
    }
    | {"secret", "token", "password", "passwd", "pwd"},
    key=lambda s: (-len(s), s),
)
_LABEL = "(?:" + "|".join(re.escape(label) for label in _LABELS) + ")"
_SECRET_CHARS = r"[A-Za-z0-9_\-./+=]"
_ASSIGN = r"""["']?[ \t]{0,3}[:=][ \t]{0,3}["']?"""
_GENERIC_TAIL = re.compile(
    r"(?i:"
    + _WORD_START
    + r"(?:"
    + _trie(([re.escape(ch) for ch in label] for label in _LABELS), lambda tok: "")
    + "|"
    + _LABEL
    + r"""["']?[ \t]{0,3}(?:[:=][ \t]{0,3}["']?(?P<value>"""
    + _SECRET_CHARS
    + r"*))?"
    + r"))\Z"
)


def _generic_open(text: str, i: int, endpos: int) -> bool:
    m = _GENERIC_TAIL.match(text, i, endpos)
    if m is None:
        return False
    value = m.group("value")
    # the verdict on a value is final after 32 characters
    return value is None or len(value) < 32 or looks_secret(value)


GENERIC_SECRET = Detector(
    "api_key",
    re.compile(
        r"(?i:" + _WORD_START + _LABEL + r"(?![A-Za-z0-9_]))"
        r"" + _ASSIGN + r"(?P<secret>" + _SECRET_CHARS + r"{16,})"
    ),
    _GENERIC_TAIL,
    validate=secret_span,
    evidence=re.compile(
        r"(?i:" + _LABEL + r")" + _ASSIGN + r"(?P<secret>" + _SECRET_CHARS + r"{8})"
    ),
    refine=_generic_open,
    commit=lambda m: len(m.group("secret")) >= 32,
)

_PK_KIND = r"(?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----"
_PK_HEADER = re.compile(r"-----BEGIN " + _PK_KIND)
_PK_FOOTER = re.compile(r"-----END " + _PK_KIND)


def _private_key_open(text: str, i: int, endpos: int) -> bool:
    header = _PK_HEADER.match(text, i, endpos)
    if header is None:
        return True  # still a prefix of the header (the tail said so)
    return _PK_FOOTER.search(text, header.end(), endpos) is None


PRIVATE_KEY = Detector(
    "private_key",
    # a block without its END line runs to the end of the text
    re.compile(r"-----BEGIN " + _PK_KIND + r"(?:.*?-----END " + _PK_KIND + r"|.*\Z)", re.S),
    re.compile(
        r"(?:"
        + _lit("-----BEGIN ", r"[A-Z0-9 ]{0,40}-{0,5}")
        + r"|-----BEGIN "
        + _PK_KIND
        + r".*)\Z",
        re.S,
    ),
    evidence=re.compile(r"-----BEGIN "),
    refine=_private_key_open,
    commit=lambda m: True,
)

#: Built-in detectors per rule, in priority order (at one start position the
#: first that matches wins).
BUILTIN: dict[str, tuple[Detector, ...]] = {
    "private_key": (PRIVATE_KEY,),
    "api_key": (CHATHUB_KEY, SK_KEY, GITHUB_TOKEN, SLACK_TOKEN, AWS_KEY, GENERIC_SECRET),
    "card": (CARD,),
    "iban": (IBAN,),
    "email": (EMAIL,),
    "phone": (PHONE,),
}


def normalise_phrase(phrase: str) -> str:
    return " ".join(phrase.split())


def blocklist_detector(phrases: Iterable[str]) -> Detector | None:
    """Case-insensitive, word-bounded phrases; any run of whitespace in the text
    matches a space in a phrase."""
    cleaned = sorted({normalise_phrase(p) for p in phrases if p.strip()}, key=lambda p: -len(p))
    if not cleaned:
        return None

    def tokens(phrase: str) -> list[str]:
        return [r"\s+" if ch == " " else re.escape(ch.lower()) for ch in phrase]

    def bounded(phrase: str) -> str:
        head = r"(?<!\w)" if re.match(r"\w", phrase[0]) else ""
        tail = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
        return head + "".join(tokens(phrase)) + tail

    def guard(tok: str) -> str:
        return r"(?<!\w)" if re.fullmatch(r"\w", tok.replace("\\", "")) else ""

    return Detector(
        "blocklist",
        re.compile("|".join(bounded(p) for p in cleaned), re.I),
        re.compile("(?:" + _trie((tokens(p) for p in cleaned), guard) + r")\Z", re.I),
    )


def build_detectors(active: Iterable[str], blocklist: Iterable[str] = ()) -> tuple[Detector, ...]:
    """The detectors of the ``active`` rules, in priority order: blocked
    phrases first, then private keys, API keys, cards, IBANs, e-mails, phones."""
    wanted = set(active)
    out: list[Detector] = []
    if "blocklist" in wanted:
        phrases = blocklist_detector(blocklist)
        if phrases is not None:
            out.append(phrases)
    for rule, detectors in BUILTIN.items():
        if rule in wanted:
            out.extend(detectors)
    return tuple(out)


def scan(
    detectors: Sequence[Detector], text: str, pos: int = 0, limit: int | None = None
) -> list[Hit]:
    """Non-overlapping hits starting in ``[pos, limit)``: the leftmost first; at
    one start the detector listed first; scanning goes on after each hit's end."""
    stop = len(text) if limit is None else limit
    heads = [d.find(text, pos) for d in detectors]
    hits: list[Hit] = []
    while True:
        best: Hit | None = None
        for h in heads:
            if h is not None and (best is None or h.start < best.start):
                best = h
        if best is None or best.start >= stop:
            return hits
        hits.append(best)
        pos = best.end
        for k, h in enumerate(heads):
            if h is not None and h.start < pos:
                heads[k] = detectors[k].find(text, pos)


def detect(text: str, detectors: Sequence[Detector] | None = None) -> list[Finding]:
    """All findings in ``text`` (by default with every built-in detector)."""
    dets = detectors if detectors is not None else build_detectors(BUILTIN)
    return [
        Finding(h.detector.rule, (h.redact_start, h.end), text[h.redact_start : h.end])
        for h in scan(dets, text)
    ]
