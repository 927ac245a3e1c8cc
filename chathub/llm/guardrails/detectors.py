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
  keys, JSON Web Tokens, private-key blocks): its replacement can then be
  sent early;
- ``extend``: for such a certain match, whether it is still open once more
  text arrives, from the new text and a bounded look-back only, so that a
  long match costs the same per chunk as a short one;
- ``evidence``: whether an unfinished candidate already shows the rule's
  tell-tale part (the ``@`` of an e-mail, a dozen card digits, a key
  prefix such as a JWT's ``eyJ``). Only such a candidate may be redacted
  early when the hold-back limits run out.

Patterns read at most two characters behind a match and the text the ``tail``
covers ahead of it; a match that starts before the earliest open tail can
therefore no longer change, whatever follows. That property is what lets
:mod:`~chathub.llm.guardrails.holdback` release text early and still produce
exactly the same result as a scan of the whole text.

Every detector also says where its matches and tails may *begin*: where
(``word_start``, ``leads``: by default only at a word start, a character that
is not whitespace after one that is not an ASCII letter or digit) and with
which character (``first``). The condition is put in front of ``pattern`` and
``tail`` when the detector is made, so it holds by construction (for the
built-in rules it only restates their own look-behinds and first characters);
the streaming filter uses it to look only at word starts, and there only at
the detectors that may begin with the character found.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

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
#: For a certain match (see Committer) that was open over ``text[:k]``:
#: ``extend(text, k, whole)`` is the end of the longest prefix of ``text``
#: over which it is still open, or None when it is open over all of it.
#: ``text`` holds the match from index 0 when ``whole``, else (at least) its
#: last :data:`EXTEND_CONTEXT` characters before ``k``.
Extender = Callable[[str, int, bool], "int | None"]
#: The look-back an :data:`Extender` may rely on when it does not see the
#: whole match.
EXTEND_CONTEXT = 256


def _whole(m: re.Match[str]) -> tuple[int, int] | None:
    return m.start(), m.end()


#: A word start: not whitespace, and not right after an ASCII letter or digit.
WORD_START = r"(?-i:(?<![A-Za-z0-9]))(?!\s)"


def start_condition(word_start: bool, leads: str, first: str | None) -> str:
    """A zero-width regex for where a detector's match or tail may begin: at a
    word start (when ``word_start``) or at any of the characters ``leads``,
    and at a character that ``first`` (a regex for one character) matches;
    with the flags of the regex it is put in front of."""
    parts = [WORD_START] if word_start else []
    if leads:
        parts.append("(?=[" + "".join(re.escape(ch) for ch in sorted(set(leads))) + "])")
    where = "(?:" + "|".join(parts) + ")" if parts else "(?!)"
    return where if first is None else f"{where}(?={first})"


def _starting(pattern: re.Pattern[str], start: str) -> re.Pattern[str]:
    return re.compile(f"{start}(?:{pattern.pattern})", pattern.flags)


@dataclass(frozen=True, eq=False)
class Detector:
    """``pattern`` and ``tail`` may only match where ``word_start``,
    ``leads`` and ``first`` allow (see :func:`start_condition`); the detector
    puts that condition in front of both when it is made, and keeps it as
    ``start`` (compiled with the flags of ``tail``)."""

    rule: str
    pattern: re.Pattern[str]
    tail: re.Pattern[str]
    validate: Validator = _whole
    evidence: re.Pattern[str] | None = None
    refine: Refiner | None = None
    commit: Committer | None = None
    #: how a certain match stays open (only with ``commit``)
    extend: Extender | None = None
    #: characters at which a match or tail may begin anywhere, not only at a word start
    leads: str = ""
    #: whether a match or tail may begin at a word start
    word_start: bool = True
    #: a regex for the first character of a match or tail (None: any)
    first: str | None = None
    start: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        start = start_condition(self.word_start, self.leads, self.first)
        if self.tail.flags != self.pattern.flags:
            raise ValueError("pattern and tail must have the same flags")
        if self.extend is not None and self.commit is None:
            raise ValueError("extend is for committable detectors")
        object.__setattr__(self, "pattern", _starting(self.pattern, start))
        object.__setattr__(self, "tail", _starting(self.tail, start))
        object.__setattr__(self, "start", re.compile(start, self.tail.flags))

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


def _words(words: Iterable[Sequence[str]]) -> str:
    """Exactly one of the token sequences, as one regex shaped like a trie (so
    that a text fails at its first token, not once per sequence)."""
    end = ""  # marks where a sequence ends
    root: _Trie = {}
    for toks in words:
        node = root
        for tok in toks:
            node = node.setdefault(tok, {})
        node[end] = {}

    def emit(node: _Trie) -> str:
        alts = [tok + emit(child) for tok, child in node.items() if tok != end]
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if end in node:
            return f"(?:{body})?" if alts else ""
        return body

    return emit(root) if root else "(?!)"


def _grows(chars: str) -> Extender:
    """The :data:`Extender` of a match that stays open exactly while the text
    goes on with characters of the class ``[chars]``."""
    stop = re.compile(f"[^{chars}]")

    def extend(text: str, k: int, whole: bool) -> int | None:
        m = stop.search(text, k)
        return None if m is None else m.start()

    return extend


# -- the built-in detectors -------------------------------------------------------

_EMAIL_LOCAL = r"[A-Za-z0-9._%+\-]"
_EMAIL_PATTERN = re.compile(
    # (a local part never gives back characters: none of them is an "@")
    rf"(?<!{_EMAIL_LOCAL}){_EMAIL_LOCAL}{{1,64}}+@"
    # the first "x.tld" must come within 67 characters of the "@", so that a
    # candidate without one can be given up on after a bounded wait
    r"(?=[A-Za-z0-9.\-]{0,63}[A-Za-z0-9\-]\.[A-Za-z]{2})"
    r"[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_EMAIL_TAIL = re.compile(
    rf"(?<!{_EMAIL_LOCAL})(?:"
    # a local part, maybe "@" and a domain within the look-ahead window
    rf"{_EMAIL_LOCAL}{{1,64}}+(?:@[A-Za-z0-9.\-]{{0,67}}+)?\Z"
    # past the window: open only while a match exists (and may grow)
    rf"|(?={_EMAIL_PATTERN.pattern}){_EMAIL_LOCAL}{{1,64}}+@[A-Za-z0-9.\-]{{68,}}+\Z"
    r")"
)


EMAIL = Detector(
    "email",
    _EMAIL_PATTERN,
    _EMAIL_TAIL,
    evidence=re.compile(rf"{_EMAIL_LOCAL}{{1,64}}@[A-Za-z0-9\-]"),
    commit=lambda m: True,  # no right-hand look-ahead: more text only extends it
    # past a match the tail reads domain characters only
    extend=_grows(r"A-Za-z0-9.\-"),
    first=_EMAIL_LOCAL,
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
    first=r"[+(0-9]",
)

# digit groups: a space, a hyphen or a no-break space (U+00A0, or U+202F as in French)
_CARD_SEP = r"[ \-\u00a0\u202f]"
_CARD_START = r"(?<![A-Za-z0-9_])" + f"(?<![0-9]{_CARD_SEP})"
CARD = Detector(
    "card",
    re.compile(_CARD_START + f"[0-9](?:{_CARD_SEP}?[0-9]){{12,18}}" + r"(?![A-Za-z0-9_])"),
    re.compile(_CARD_START + f"[0-9](?:{_CARD_SEP}?[0-9]){{0,18}}{_CARD_SEP}?" + r"\Z"),
    validate=card_span,
    evidence=re.compile(f"[0-9](?:{_CARD_SEP}?[0-9]){{11}}"),
    first="[0-9]",
)
# Four groups of four digits separated by full stops (4111.1111.1111.1111):
# its own detector, since a full stop never joins the groups of CARD (where
# "3.5" or "1.000.000" would become card candidates). Its tail holds nothing
# the phone tail does not hold already (same start, digits and single full
# stops, at most 19 characters). Luhn decides, as for CARD.
CARD_DOTTED = Detector(
    "card",
    re.compile(_NUM_START + r"[0-9]{4}(?:\.[0-9]{4}){3}(?![A-Za-z0-9_])"),
    re.compile(_NUM_START + r"(?=[0-9])(?:[0-9]{4}\.){0,3}[0-9]{0,4}\Z"),
    validate=card_span,
    evidence=re.compile(r"[0-9]{4}\.[0-9]{4}\.[0-9]{4}"),
    first="[0-9]",
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
    first="[A-Z]",
)

_TOKEN_START = r"(?<![A-Za-z0-9_\-])"


def _prefixed_key(first: str, prefix_tail: str, pattern: str, evidence: str, body: str) -> Detector:
    """A key with a fixed prefix (beginning with ``first``) and an open-ended
    body of the characters ``[body]``: once it matches, more body characters
    only make it longer, so it can be committed early."""
    return Detector(
        "api_key",
        re.compile(_TOKEN_START + pattern),
        re.compile(_TOKEN_START + f"(?:{prefix_tail})" + r"\Z"),
        evidence=re.compile(evidence),
        commit=lambda m: True,
        extend=_grows(body),
        first=re.escape(first),
    )


_B64_CHARS = r"A-Za-z0-9_\-"
_B64 = f"[{_B64_CHARS}]"
CHATHUB_KEY = _prefixed_key(
    "c",
    _lit("chk_", r"[0-9a-f]{0,8}(?:_" + _B64 + "*)?"),
    r"chk_[0-9a-f]{8}_" + _B64 + "{20,}",
    r"chk_[0-9a-f]{4}",
    _B64_CHARS,
)
SK_KEY = _prefixed_key(
    "s", _lit("sk-", _B64 + "*"), r"sk-" + _B64 + "{20,}", r"sk-" + _B64 + "{8}", _B64_CHARS
)
# two detectors, since their bodies differ (a "_" ends a ghp_ token)
GITHUB_TOKEN = _prefixed_key(
    "g",
    _lit("gh") + r"|gh[pousr](?:_[A-Za-z0-9]*)?",
    r"gh[pousr]_[A-Za-z0-9]{36,}",
    r"gh[pousr]_[A-Za-z0-9]{8}",
    "A-Za-z0-9",
)
GITHUB_PAT = _prefixed_key(
    "g",
    _lit("github_pat_", r"[A-Za-z0-9_]*"),
    r"github_pat_[A-Za-z0-9_]{22,}",
    r"github_pat_[A-Za-z0-9_]{4}",
    "A-Za-z0-9_",
)
SLACK_TOKEN = _prefixed_key(
    "x",
    _lit("xox") + r"|xox[abposr](?:-[A-Za-z0-9\-]*)?",
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    r"xox[abposr]-[A-Za-z0-9\-]{4}",
    r"A-Za-z0-9\-",
)
AWS_KEY = Detector(
    "api_key",
    re.compile(r"(?<![A-Za-z0-9])A[KS]IA[0-9A-Z]{16}(?![0-9A-Za-z])"),
    re.compile(r"(?<![A-Za-z0-9])A(?:[KS](?:I(?:A[0-9A-Z]{0,16})?)?)?\Z"),
    evidence=re.compile(r"A[KS]IA[0-9A-Z]{4}"),
    first="A",
)

# A JSON Web Token: base64url segments joined by dots, the header and the
# payload each a JSON object (so beginning "eyJ", '{"') of 10+ characters,
# then the signature and any further segments (none for an unsecured token:
# the claims are the secret). A dot not followed by a segment character (a
# full stop) is no part of it. Once the header, its dot and a payload of 10
# characters have shown, the match is certain: more text only makes it longer
# (no look-ahead), so it is committed and swallowed however long it grows.
# The header is at most _JWT_HEADER_MAX characters, so that a candidate that
# is no match yet stays bounded; a "Bearer " before the token stays visible.
_JWT_HEADER_MAX = 512
_JWT_HEADER = _B64 + "{7," + str(_JWT_HEADER_MAX - 3) + "}"
_JWT_MORE = r"(?:\.[A-Za-z0-9_\-]+)*"
# the end of a JWT that may still grow: a run of segment characters, or a dot
# that a segment character must follow
_JWT_STOP = re.compile(r"[^A-Za-z0-9_\-.]|(?<=\.)\.")


def _jwt_extend(text: str, k: int, whole: bool) -> int | None:
    # reads one character behind k: whether a dot came last
    m = _JWT_STOP.search(text, k)
    return None if m is None else m.start()


JWT = Detector(
    "api_key",
    re.compile(_TOKEN_START + "eyJ" + _JWT_HEADER + r"\.eyJ" + _B64 + "{7,}+" + _JWT_MORE),
    re.compile(
        _TOKEN_START
        + "(?:"
        + _lit(
            "eyJ",
            _B64
            + "{0,"
            + str(_JWT_HEADER_MAX - 3)
            + "}|"
            + _JWT_HEADER
            + r"\.(?:"
            + _lit("eyJ", _B64 + "{0,6}|" + _B64 + "{7,}" + _JWT_MORE + r"\.?")
            + ")?",
        )
        + r")\Z"
    ),
    # a key prefix and 8 characters, as for the prefixed keys
    evidence=re.compile("eyJ" + _B64 + "{8}"),
    commit=lambda m: True,
    extend=_jwt_extend,
    first="e",
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
_LABEL = _words([re.escape(ch) for ch in label] for label in _LABELS)
_SECRET_CLASS = r"A-Za-z0-9_\-./+="
_SECRET_CHARS = f"[{_SECRET_CLASS}]"
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
        r"" + _ASSIGN + r"(?P<secret>" + _SECRET_CHARS + r"{16,}"
        # a full stop that ends a sentence is not part of the value
        r"(?!(?<=\.)(?:\s|\Z)))"
    ),
    _GENERIC_TAIL,
    validate=secret_span,
    evidence=re.compile(
        r"(?i:" + _LABEL + r")" + _ASSIGN + r"(?P<secret>" + _SECRET_CHARS + r"{8})"
    ),
    refine=_generic_open,
    commit=lambda m: len(m.group("secret")) >= 32,
    extend=_grows(_SECRET_CLASS),
    first="(?i:[" + "".join(sorted({label[0] for label in _LABELS})) + "])",
)

# words of at most 32 characters, so that a header is at most 126 characters
_PK_WORD = r"[A-Z0-9]{1,32}"
_PK_KIND = rf"(?:{_PK_WORD} ){{0,3}}PRIVATE KEY-----"
_PK_HEADER = re.compile(r"-----BEGIN " + _PK_KIND)
_PK_FOOTER = re.compile(r"-----END " + _PK_KIND)
_PK_HEADER_MAX = len("-----BEGIN ") + 3 * 33 + len("PRIVATE KEY-----")
_PK_FOOTER_MAX = len("-----END ") + 3 * 33 + len("PRIVATE KEY-----")
assert _PK_HEADER_MAX + _PK_FOOTER_MAX < EXTEND_CONTEXT


def _private_key_open(text: str, i: int, endpos: int) -> bool:
    header = _PK_HEADER.match(text, i, endpos)
    if header is None:
        return True  # still a prefix of the header (the tail said so)
    return _PK_FOOTER.search(text, header.end(), endpos) is None


def _private_key_extend(text: str, k: int, whole: bool) -> int | None:
    # No footer ends before k, so a new one begins within a footer's length of
    # it, and never inside the header (a header ends more than that before k
    # unless the whole block is in view).
    header = _PK_HEADER.match(text) if whole else None
    start = k - _PK_FOOTER_MAX + 1
    if header is not None and header.end() > start:
        start = header.end()
    footer = _PK_FOOTER.search(text, max(start, 0))
    return None if footer is None else footer.end() - 1


PRIVATE_KEY = Detector(
    "private_key",
    # a block without its END line runs to the end of the text
    re.compile(r"-----BEGIN " + _PK_KIND + r"(?:.*?-----END " + _PK_KIND + r"|.*\Z)", re.S),
    re.compile(
        r"(?:"
        # any beginning of a header: up to three words, then "PRIVATE KEY-----"
        + _lit(
            "-----BEGIN ",
            rf"(?:{_PK_WORD} ){{0,3}}(?:" + _lit("PRIVATE KEY-----") + rf"|{_PK_WORD})?",
        )
        + r"|-----BEGIN "
        + _PK_KIND
        + r".*)\Z",
        re.S,
    ),
    evidence=re.compile(r"-----BEGIN "),
    refine=_private_key_open,
    commit=lambda m: True,
    extend=_private_key_extend,
    leads="-",
    word_start=False,
    first="-",
)

#: Built-in detectors per rule, in priority order (at one start position the
#: first that matches wins).
BUILTIN: dict[str, tuple[Detector, ...]] = {
    "private_key": (PRIVATE_KEY,),
    "api_key": (
        CHATHUB_KEY,
        SK_KEY,
        GITHUB_TOKEN,
        GITHUB_PAT,
        SLACK_TOKEN,
        AWS_KEY,
        JWT,
        GENERIC_SECRET,
    ),
    "card": (CARD, CARD_DOTTED),
    "iban": (IBAN,),
    "email": (EMAIL,),
    "phone": (PHONE,),
}


def normalise_phrase(phrase: str) -> str:
    return " ".join(phrase.split())


#: At most this many whitespace characters in a text match one space of a
#: blocked phrase, so that a blocked phrase matches (and an unfinished one
#: holds) at most its length with each space stretched to this many.
PHRASE_GAP = 8


def _phrase_char(ch: str, *, tail: bool = False) -> str:
    """A regex (for re.I) for one character of a blocked phrase: a space is a
    run of whitespace; any other character matches itself and its upper- and
    lowercase forms, also where one of those is longer ("ß" is "SS" in
    uppercase, "İ" an "i" and a combining dot in lowercase). For a ``tail``,
    also any beginning of such a longer form at the end of the text."""
    if ch == " ":
        return rf"\s{{1,{PHRASE_GAP}}}"
    forms = {ch, ch.lower(), ch.upper()}
    if all(len(form) == 1 for form in forms):
        return re.escape(ch.lower())
    # longest first: a shorter form may match the beginning of a longer one
    alts = [re.escape(form) for form in sorted(forms, key=lambda f: (-len(f), f))]
    if tail:
        starts = {form[:k] for form in forms for k in range(1, len(form))}
        alts += [re.escape(start) + r"\Z" for start in sorted(starts)]
    return "(?:" + "|".join(alts) + ")"


def blocklist_detector(phrases: Iterable[str]) -> Detector | None:
    """Case-insensitive, word-bounded phrases; a run of 1 to :data:`PHRASE_GAP`
    whitespace characters in the text matches a space in a phrase. A phrase
    always matches itself and its upper- and lowercase forms (see
    :func:`_phrase_char`)."""
    cleaned = sorted({normalise_phrase(p) for p in phrases if p.strip()}, key=lambda p: -len(p))
    if not cleaned:
        return None

    def tokens(phrase: str, *, tail: bool = False) -> list[str]:
        return [_phrase_char(ch, tail=tail) for ch in phrase]

    def bounded(phrase: str) -> str:
        head = r"(?<!\w)" if re.match(r"\w", phrase[0]) else ""
        tail = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
        return head + "".join(tokens(phrase)) + tail

    # the first tokens of the phrases that begin with a word character
    word_firsts = {tokens(p, tail=True)[0] for p in cleaned if re.match(r"\w", p[0])}

    def guard(tok: str) -> str:
        return r"(?<!\w)" if tok in word_firsts else ""

    # A phrase whose pattern and tail both begin with (?<!\w) starts at a word
    # start; any other, at its first character (compared case-insensitively).
    def cases(ch: str) -> str:
        return ch + ch.lower()[0] + ch.upper()[0]

    leads = "".join(
        cases(p[0])
        for p in cleaned
        if not (re.match(r"\w", p[0]) and guard(tokens(p, tail=True)[0]))
    )
    # a phrase begins with the first character of its first character's forms
    firsts = {ch for p in cleaned for ch in cases(p[0])}
    return Detector(
        "blocklist",
        re.compile("|".join(bounded(p) for p in cleaned), re.I),
        re.compile("(?:" + _trie((tokens(p, tail=True) for p in cleaned), guard) + r")\Z", re.I),
        leads=leads,
        first="[" + "".join(re.escape(ch) for ch in sorted(firsts)) + "]",
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
