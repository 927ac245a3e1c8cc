"""The streaming output guardrail: a hold-back filter over reply tokens. Pure.

:class:`HoldbackFilter` sits between the provider's token stream and the
session log. It releases text as soon as no pattern (e-mail, phone, card, IBAN,
key, private-key block, blocked phrase) can still start in it, and holds back
the rest: the *open candidate*, the shortest tail of the text seen so far that
might still grow into a match. In ordinary prose that is the word being typed.

Guarantees
----------
1. **Exact.** Unless a hold-back limit forces an early redaction (3.), the
   concatenated outputs of ``feed``... ``flush`` equal :func:`redact_all` of
   the whole text, whatever the chunking and the timing. (A stream cut short
   ends with ``flush(now, complete=False)``, which releases no more text.) Released text never
   changes afterwards; no rollback is needed, because a match that starts
   before the earliest open candidate can no longer change.
2. **Nothing leaks.** No character of a span that :func:`redact_all` redacts
   (nor anything from a blocked span on) is ever released, limits or not.
3. **Bounded hold.** Visible held text stays within ``holdback_chars``
   characters and ``holdback_ms`` since its oldest character arrived, except
   as follows. When a limit is reached the filter looks at the open
   candidate. If it already shows *evidence* of a rule (an e-mail's ``@``
   and one domain character, 12 card digits, 10 phone digits or 7 after a
   ``+``, an IBAN's country, check digits and 8 more, a key prefix and 4-8
   body characters (a JWT's ``eyJ`` and 8), ``label=`` and 8 value
   characters, ``-----BEGIN``), it is
   **redacted conservatively**: the rule's replacement is sent at once and
   the candidate swallowed until it is complete. If it turns out a real
   match, the output is the same as in 1.; if not (a Luhn-invalid number,
   an address without a top-level domain) what it swallowed stays
   redacted: over-redaction, never a leak. A candidate *without* evidence
   (a partial word, a short number, the start of a label or of a blocked
   phrase) is never released early, since that could show the first
   characters of a secret: it waits for the next chunk or ``flush``, past
   the limits. Such a candidate is at most 65 characters (an e-mail local
   part and its ``@``) or the longest blocked phrase, with each of its
   spaces stretched to ``PHRASE_GAP`` (8) whitespace characters.

   Open candidates are short in practice: the longest possible are an
   e-mail before its domain shows a top-level domain (132 characters), a
   generic ``label: value`` (53), an IBAN (65), a phone number (49), a
   card number (38); and a JSON Web Token before its payload shows 10
   characters, which is its header (at most 512 characters, and evidence
   from its 11th on), a dot and 9 more. A match that is certain before it
   ends (an e-mail, a prefixed API key, a JWT once its header, a dot and 10
   payload characters show, a generic secret of 32+ characters, a
   private-key block) is *committed*: its replacement is sent as soon as it
   is certain and the rest swallowed as it arrives, so it holds nothing
   visible however long it grows. Hence with ``holdback_chars`` >= 132 only
   ``holdback_ms`` can force an early redaction (a JWT header longer than
   that aside), and with ``holdback_ms=math.inf`` as well, 1. always holds.
4. **Sentences.** No pattern spans the end of a sentence (``.``, ``!`` or
   ``?`` then a space), so no text is held across one (a private-key block,
   which is swallowed anyway, and a blocked phrase containing such
   punctuation aside).
5. **Block.** A finding whose rule is ``block`` ends the output: it holds
   the text before the blocked span, ``blocked`` is true, the ``actions``
   end with ``("blocked", rule)``, and every later call returns nothing. The
   caller stops the stream and sends ``policy.safe_message``.

Cost: a ``feed`` looks at the held text and the new chunk only (the released
text is dropped but for a few characters of look-behind context), and mostly
at much less. The detector last found open at the candidate is asked first
whether it still is (one regex, which also says whether its pattern matches
there): while a word or a number grows, that is all. Otherwise only the
positions where some detector's match or tail may begin are looked at (word
starts, and a few lead characters such as the ``-`` of ``-----BEGIN``), and
there only the detectors that may begin with the character found. Since every
detector puts that start condition in front of its own regexes (see
:func:`~chathub.llm.guardrails.detectors.start_condition`), this finds exactly
what asking every detector at every position would.

A committed candidate that is a certain match (an e-mail, a prefixed key, a
JWT, a generic secret of 32+ characters, a private-key block) is kept out of the
text the filter looks at while it grows: each chunk of it is checked on its
own, with a look-back of at most ``EXTEND_CONTEXT`` characters (see
``Detector.extend``), so a chunk costs the same however long the match
already is. The match is scanned once more, as a whole, when it ends.
"""

from __future__ import annotations

import functools
import math
import re
from collections import deque
from dataclasses import dataclass

from chathub.llm.guardrails.detectors import EXTEND_CONTEXT, Detector, Extender, Hit, scan
from chathub.llm.guardrails.policy import Policy

#: Released characters kept before the unreleased text, for look-behinds.
_CONTEXT = 8
#: The shortest text a committable match can have ("a@b.co").
_COMMIT_MIN = 6
#: Not part of a forced replacement when they end the candidate.
_TRAILING = frozenset(" \t\n.,;:!?-()'\"")
#: Every committable match contains one of these (a JWT: its dots).
_COMMIT_HINT = re.compile(r"[@\-_:=.]")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@dataclass(frozen=True, slots=True)
class FilterOutput:
    """What may be sent now. ``actions`` are ``(action, rule)`` pairs, action
    ``redacted`` or ``blocked``, in text order (for ``reply.guardrail`` events
    and metrics). When ``blocked``, ``text`` is what precedes the blocked span
    and nothing follows."""

    text: str = ""
    actions: tuple[tuple[str, str], ...] = ()
    blocked: bool = False


_NOTHING = FilterOutput()


class _Swallowed:
    """A committed candidate that is a certain match, growing outside the
    filter's text: the chunks received since, and the candidate's last
    EXTEND_CONTEXT characters (all of it while ``whole``)."""

    __slots__ = ("chunks", "extend", "size", "whole", "window")

    def __init__(self, extend: Extender, candidate: str) -> None:
        self.extend = extend
        self.chunks: list[str] = []
        self.size = 0
        self.whole = len(candidate) <= EXTEND_CONTEXT
        self.window = candidate if self.whole else candidate[-EXTEND_CONTEXT:]


# for FilterOutput(...) without the frozen dataclass's slower __init__ (most
# tokens make one): the slots' own setters
_new = object.__new__
_set_text = FilterOutput.__dict__["text"].__set__
_set_actions = FilterOutput.__dict__["actions"].__set__
_set_blocked = FilterOutput.__dict__["blocked"].__set__


def redact_all(text: str, policy: Policy) -> FilterOutput:
    """The policy applied to a whole text at once: the reference the streaming
    filter must agree with."""
    parts: list[str] = []
    actions: list[tuple[str, str]] = []
    pos = 0
    for hit in scan(policy.detectors, text):
        rule = hit.detector.rule
        parts.append(text[pos : hit.start])
        if policy.action(rule) == "block":
            actions.append(("blocked", rule))
            return FilterOutput("".join(parts), tuple(actions), True)
        parts.append(text[hit.start : hit.redact_start])
        parts.append(policy.replacement(rule))
        actions.append(("redacted", rule))
        pos = hit.end
    parts.append(text[pos:])
    return FilterOutput("".join(parts), tuple(actions), False)


def _scoped(pattern: re.Pattern[str]) -> str:
    flags = "".join(f for f, bit in (("i", re.I), ("s", re.S)) if pattern.flags & bit)
    return f"(?{flags}:{pattern.pattern})" if flags else f"(?:{pattern.pattern})"


_NEVER = re.compile("(?!)")


def _union(patterns: list[re.Pattern[str]]) -> re.Pattern[str]:
    if not patterns:
        return _NEVER
    # group names repeat across detectors, and the unions need none
    return re.compile("|".join(re.sub(r"\(\?P<\w+>", "(?:", _scoped(p)) for p in patterns))


#: What :meth:`_Tables.at` says about one position: the detectors that may
#: begin there, in the order to ask which is open, and in priority order.
_Starting = tuple[tuple[Detector, ...], tuple[Detector, ...]]
#: The group a probe (see _Tables) sets when the tail matched (its only group).
_TAIL = "tail_"


class _Tables:
    """What the filters of one detector list share: which detectors may begin
    where, and regexes to ask them."""

    def __init__(self, detectors: tuple[Detector, ...]) -> None:
        self.detectors = detectors
        # which detector is open is checked most often for words and numbers
        self.open_order = tuple(sorted(detectors, key=lambda d: d.rule not in ("email", "phone")))
        self.rank = {d: k for k, d in enumerate(detectors)}
        #: some pattern may match here
        self.any_match = _union([d.pattern for d in detectors])
        #: Per detector, its tail (setting the group _TAIL) or else its
        #: pattern: one look for "open here?" and "a match here?".
        strip = functools.partial(re.sub, r"\(\?P<\w+>", "(?:")
        self.probe = {
            d: re.compile(
                f"(?:{strip(d.tail.pattern)})(?P<{_TAIL}>)|(?:{strip(d.pattern.pattern)})",
                d.tail.flags,
            )
            for d in detectors
        }
        #: Where some detector's match or tail may begin, besides the position
        #: a search begins at: at each character this finds and right after
        #: it. That is every word start, and every lead unless one is an ASCII
        #: letter or digit (then this finds every character).
        alnum = [chr(c) for c in range(128) if chr(c).isalnum()]
        if any(d.start.match("a" + ch, 1) for d in detectors for ch in alnum):
            self.starts = re.compile(r"(?s:.)")
        else:
            self.starts = re.compile(r"[^A-Za-z0-9]")
        self.starting: dict[str, _Starting] = {}
        #: characters at which nothing begins, wherever they are
        self.inert = frozenset(ch for ch in " \n\t" if not self.at(ch)[0])

    def at(self, key: str) -> _Starting:
        """The detectors whose match or tail may begin at the last character
        of ``key``, which holds the character before it too (if any): a start
        condition reads no more than those two characters."""
        found = self.starting.get(key)
        if found is None:
            i = len(key) - 1
            dets = tuple(d for d in self.open_order if d.start.match(key, i))
            found = dets, tuple(d for d in self.detectors if d in dets)
            if len(self.starting) < 8192:  # bounded, whatever the text
                self.starting[key] = found
        return found


@functools.lru_cache(maxsize=64)
def _tables(detectors: tuple[Detector, ...]) -> _Tables:
    return _Tables(detectors)


class HoldbackFilter:
    """Redacts or blocks patterns in a stream of text chunks; see the module
    docstring for what is guaranteed.

    ``now`` is a monotonic clock in seconds. Use one filter per reply: ``feed``
    each chunk, ``poll`` when no chunk came for a while, ``flush`` at the end:
    ``flush(now)`` when the reply is complete, ``flush(now, complete=False)``
    when it was cancelled or failed.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        holdback_chars: int = 128,
        holdback_ms: float = 250.0,
    ) -> None:
        if holdback_chars < 1:
            raise ValueError("holdback_chars must be positive")
        if not holdback_ms > 0:
            raise ValueError("holdback_ms must be positive (math.inf for no time limit)")
        self.policy = policy
        self.holdback_chars = holdback_chars
        self.holdback_ms = holdback_ms
        self._timed = holdback_ms != math.inf
        self._dets = policy.detectors
        # A policy that looks for nothing (every rule off, no blocklist) holds
        # nothing: each chunk is released as it comes.
        self._passthrough = not self._dets
        self._tables = tables = _tables(self._dets)
        self._probe = tables.probe
        self._starting = tables.starting
        self._search = tables.starts.search
        self._inert = tables.inert
        # _text = up to _CONTEXT released characters, then the unreleased text
        self._text = ""
        self._offset = 0  # absolute position of _text[0]
        self._pos = 0  # where the unreleased text begins
        self._hidden = 0  # text before this was covered by a replacement sent early
        # a candidate at _pos whose replacement went out early (forced: by a limit)
        self._commit: tuple[Detector, bool] | None = None
        self._forced_end = 0  # text length when a limit forced the replacement
        # the committed candidate, once certain, while it grows (see _swallow)
        self._swallowed: _Swallowed | None = None
        self._arrivals: deque[tuple[int, float]] = deque()  # (absolute start, time)
        self._out: list[str] = []
        self._actions: list[tuple[str, str]] = []
        self._blocked = False
        self._finished = False
        # The detector last found open, and where (absolute; -1: nowhere): the
        # first asked whether it still is, which usually settles the question.
        # _open_dets: the detectors that may begin there (None: not known).
        self._open_det: Detector | None = None
        self._open_abs = -1
        self._open_dets: tuple[Detector, ...] | None = None
        # when the chunk holding absolute position _since_abs arrived (only
        # set for a position already received, so no later chunk holds it)
        self._since_abs = -1
        self._since = math.inf
        # the text from absolute _hint_base (the candidate) to _hint_clear holds
        # no character of _COMMIT_HINT
        self._hint_base = -1
        self._hint_clear = 0

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def held(self) -> int:
        """Characters received but neither sent nor covered by a replacement."""
        if self._commit is not None:
            return 0
        pos, hidden = self._pos, self._hidden
        held = len(self._text) - (pos if pos > hidden else hidden)
        return held if held > 0 else 0

    @property
    def deadline(self) -> float | None:
        """When the time limit next acts on what is held (on the clock of
        ``feed``): the oldest held character's arrival plus ``holdback_ms``.
        None when nothing is held, or there is no time limit. ``poll`` at
        that time releases it as a redaction if it shows evidence by then;
        if not, only a later chunk can change that, and ``feed`` applies the
        limits itself."""
        if not self._timed or self._finished or self._blocked or self._commit is not None:
            return None
        start = max(self._pos, self._hidden)
        if len(self._text) <= start:
            return None
        return self._arrival(self._offset + start) + self.holdback_ms / 1000.0

    def feed(self, chunk: str, now: float) -> FilterOutput:
        if self._finished:
            raise RuntimeError("feed after flush")
        if self._blocked:
            return FilterOutput(blocked=True)
        if self._passthrough:
            if not chunk:
                return _NOTHING
            passed: FilterOutput = _new(FilterOutput)
            _set_text(passed, chunk)
            _set_actions(passed, ())
            _set_blocked(passed, False)
            return passed
        if self._swallowed is not None:
            if chunk:
                self._swallow(chunk, now)
        elif chunk:
            text, offset = self._text, self._offset
            if self._timed:
                self._arrivals.append((offset + len(text), now))
            self._text = text = text + chunk
            pos = self._pos
            det = self._open_det
            if self._commit is not None:
                self._advance(final=False)
            elif det is None or self._open_abs != offset + pos:
                self._release(None, None)
            elif (m := self._probe[det].match(text, pos)) is None:
                self._release(det, False)  # neither open nor a match at _pos
            elif m.lastindex is None:  # not the tail: a match at _pos, no longer open
                self._release(det, True)
            elif det.refine is not None and not det.refine(text, pos, len(text)):
                self._release(det, None)
            else:
                # The candidate at _pos is still open, so it is still the
                # earliest one: nothing to release, and nothing to trim since
                # _pos did not move. _try_commit, unless the chunk cannot
                # change what it decides:
                n = len(text)
                if n - pos >= _COMMIT_MIN and pos >= self._hidden:
                    if (
                        self._hint_base == offset + pos
                        and self._hint_clear == offset + n - len(chunk)
                        and chunk.isalnum()  # so holds no character of _COMMIT_HINT
                    ):
                        self._hint_clear = offset + n
                    else:
                        self._try_commit()
        # _enforce_limits(now), with the usual case (no limit reached) inline
        if self._commit is None and not self._blocked:
            pos, hidden = self._pos, self._hidden
            start = pos if pos > hidden else hidden
            held = len(self._text) - start
            if held > 0:
                if held > self.holdback_chars:
                    self._force_early()
                elif self._timed:
                    absolute = self._offset + start
                    if self._since_abs != absolute:  # (the held text may start later now)
                        self._since = self._arrival(absolute)
                        self._since_abs = absolute
                    if not (now - self._since) * 1000.0 < self.holdback_ms:
                        self._force_early()
        out = self._out
        if out or self._actions or self._blocked:
            return self._take()
        return _NOTHING

    def poll(self, now: float) -> FilterOutput:
        """Time-based release when no chunk arrives (see guarantee 3.)."""
        if self._finished or self._blocked:
            return FilterOutput(blocked=self._blocked)
        self._enforce_limits(now)
        return self._take()

    def flush(self, now: float, *, complete: bool = True) -> FilterOutput:
        """End of stream; later calls return nothing and ``feed`` raises.

        ``complete=True``: the text ends here. Everything still held is
        released or redacted, so that all outputs together are exactly
        :func:`redact_all` of the text (guarantee 1.).

        ``complete=False``: the stream was cut short (cancelled, or the
        provider failed) and the open candidate will never be finished, so it
        is not released. Everything before it has been released already, as
        this flush would release it. If the candidate shows evidence of a rule
        (see 3.), the output is that rule's replacement (after the label of a
        ``label=value`` secret), as when a limit is reached: a rule whose
        action is ``block`` blocks (see 5.); otherwise the candidate is
        dropped (in prose, the word being typed; a candidate replaced early
        ends with its replacement). Hence no character of the open candidate
        but such a label is ever sent: nothing of a span that
        :func:`redact_all` would redact in any continuation of the text.
        """
        if self._finished or self._blocked:
            self._finished = True
            return FilterOutput(blocked=self._blocked)
        self._finished = True
        if complete:
            self._advance(final=True)
        elif self._commit is None and self.held > 0:
            self._force_early()
        return self._take()

    # -- internals ----------------------------------------------------------------

    def _take(self) -> FilterOutput:
        out, actions = self._out, self._actions
        if not out and not actions and not self._blocked:
            return _NOTHING
        taken: FilterOutput = _new(FilterOutput)
        _set_text(taken, out[0] if len(out) == 1 else "".join(out))
        _set_actions(taken, tuple(actions) if actions else ())
        _set_blocked(taken, self._blocked)
        out.clear()
        actions.clear()
        return taken

    def _advance(self, *, final: bool, open_end: int | None = None) -> None:
        """Resolve a committed candidate that is complete (at the end when
        ``final``; ``open_end``: where it stopped being open, when known),
        then release what may be released."""
        if self._commit is not None:
            det, forced = self._commit
            if self._swallowed is not None:  # only when final
                self._unswallow()
            elif open_end is None and not final and det.open_at(self._text, self._pos):
                if forced:
                    self._swallow_if_certain(det)
                return
            # The early-replaced candidate is complete. The scan below finds it
            # again (or what it really was) and sends nothing before _hidden.
            if forced:
                covered = self._forced_cover(det, final, open_end)
            else:
                hit = det.match_at(self._text, self._pos)  # certain, so it is there
                covered = self._pos + 1 if hit is None else hit.end
            self._hidden = max(self._hidden, covered)
            self._commit = None
        if not final:
            self._release(None, None)
            return
        # the end: release everything
        end = len(self._text)
        m = self._tables.any_match.search(self._text, self._pos) if end > self._pos else None
        self._release_to(end, m is not None and m.start() < end)
        self._trim()

    def _release(self, tried: Detector | None, tried_match: bool | None) -> None:
        """Release everything before the earliest open candidate. ``tried``:
        a detector already found not open at _pos; ``tried_match``: whether
        its pattern matches there (None: not known)."""
        text = self._text
        pos = self._pos
        s, maybe = self._earliest_open(pos, tried, tried_match)
        hidden = self._hidden
        if maybe:
            self._release_to(s, maybe)
            pos, hidden = self._pos, self._hidden
        else:  # _release_to(s, False), inline
            if s > pos and s > hidden:
                self._out.append(text[pos if pos > hidden else hidden : s])
            self._pos = pos = s
        if not self._blocked and len(text) - pos >= _COMMIT_MIN and pos >= hidden:
            self._try_commit()
        # _trim(), inline
        arrivals = self._arrivals
        if arrivals:  # forget older chunks
            absolute = self._offset + (pos if pos > hidden else hidden)
            while len(arrivals) > 1 and arrivals[1][0] <= absolute:
                arrivals.popleft()
            if absolute < self._offset + len(text):  # (else the next chunk may start there)
                self._since, self._since_abs = arrivals[0][1], absolute  # = _arrival(absolute)
        if pos - _CONTEXT >= 64:
            self._cut(pos - _CONTEXT)

    def _release_to(self, s: int, maybe: bool) -> None:
        """Release the text from _pos to ``s``, where an open candidate begins
        (or the text ends); ``maybe``: whether a match may begin before it."""
        p = self._pos
        while True:
            if maybe:
                for hit in self._hits(p, s):
                    self._emit(p, hit.start)
                    p = hit.end
                    if not self._apply(hit):
                        self._pos = p
                        return
            if p <= s:
                if s > p:
                    self._emit(p, s)
                self._pos = s
                return
            # a finished match ran past s, over the candidate there: go on after
            # it (never when flushing: then s is the end of the text)
            s, maybe = self._earliest_open(p, None, None)

    def _hits(self, p: int, s: int) -> list[Hit]:
        """``scan(self._dets, self._text, p, s)``: the same hits, found by
        looking only where a match may begin."""
        text = self._text
        tables = self._tables
        starting, search, inert = self._starting, self._search, self._inert
        hits: list[Hit] = []
        i = p
        while i < s:
            key = text[i - 1 : i + 1] if i else text[0]
            if key[-1] not in inert:
                for det in (starting.get(key) or tables.at(key))[1]:
                    hit = det.match_at(text, i)
                    if hit is not None:  # the leftmost, of the first detector listed
                        hits.append(hit)
                        break
                else:
                    hit = None
                if hit is not None:
                    i = hit.end
                    continue
            if key[-1] not in _ALNUM:
                i += 1
            elif (found := search(text, i + 1)) is not None:
                i = found.start()
            else:
                break
        return hits

    def _earliest_open(
        self, pos: int, tried: Detector | None, tried_match: bool | None
    ) -> tuple[int, bool]:
        """Where the earliest open candidate at or after ``pos`` begins
        (``len(text)`` if none), and whether some pattern may match before it
        (True may be a false alarm). ``tried``, ``tried_match``: as for
        :meth:`_release`.

        Only the positions ``_starts`` finds are looked at, and there only the
        detectors whose start condition holds: by construction no detector's
        tail or pattern matches anywhere else."""
        text = self._text
        n = len(text)
        if pos >= n:
            self._open_det = self._open_dets = None
            self._open_abs = -1
            return n, False
        hint = self._open_det
        at_hint = self._open_abs == self._offset + pos
        if tried is None and hint is not None:
            if hint.open_at(text, pos):
                if not at_hint:
                    self._open_abs = self._offset + pos
                    self._open_dets = None
                return pos, False
            tried = hint
        hint_dets = self._open_dets if at_hint else None
        tables = self._tables
        starting, probe, search, inert = self._starting, self._probe, self._search, self._inert
        maybe = False
        i = pos
        c = text[i]
        while True:
            if c not in inert:
                if i != pos:
                    dets = (starting.get(key := text[i - 1 : i + 1]) or tables.at(key))[0]
                elif hint_dets is None:
                    dets = tables.at(text[i - 1 : i + 1] if i else c)[0]
                else:
                    dets = hint_dets
                for det in dets:
                    if i == pos and det is tried:
                        continue
                    m = probe[det].match(text, i)
                    if m is None:
                        continue
                    if m.lastindex is None:  # not the tail: its pattern matched
                        maybe = True
                    elif det.refine is None or det.refine(text, i, n):  # open
                        self._open_det = det
                        self._open_abs = self._offset + i
                        self._open_dets = dets
                        return i, maybe
                    elif not maybe and det.pattern.match(text, i) is not None:
                        maybe = True
                if i == pos and tried is not None and not maybe:
                    if tried_match is None:
                        tried_match = tried.pattern.match(text, pos) is not None
                    maybe = tried_match
            # next: right after a character _starts finds (a word start), else
            # the next character it finds
            if i + 1 == n:
                break
            if c not in _ALNUM:
                i += 1
            elif (found := search(text, i + 1)) is not None:
                i = found.start()
            else:
                break
            c = text[i]
        self._open_det = self._open_dets = None
        self._open_abs = -1
        return n, maybe

    def _emit(self, start: int, end: int) -> None:
        """Send raw text[start:end], less what a replacement already covers."""
        if start < self._hidden:
            start = self._hidden
        if end > start:
            self._out.append(self._text[start:end])

    def _apply(self, hit: Hit) -> bool:
        """Send a hit's replacement; False when it blocks."""
        rule = hit.detector.rule
        action = self.policy.action(rule)
        if hit.start < self._hidden:
            # replaced early, or inside what a forced redaction covered
            self._hidden = max(self._hidden, hit.end)
        elif action != "block":
            self._emit(hit.start, hit.redact_start)
            self._out.append(self.policy.replacement(rule))
            self._actions.append(("redacted", rule))
        if action == "block":
            self._blocked = True
            self._actions.append(("blocked", rule))
            return False
        return True

    def _try_commit(self) -> None:
        """Send the replacement of a match at _pos that is already certain."""
        text, p = self._text, self._pos
        if len(text) - p < _COMMIT_MIN or p < self._hidden:
            return
        base = self._offset + p
        if self._hint_base != base:
            self._hint_base = self._hint_clear = base
        if not _COMMIT_HINT.search(text, self._hint_clear - self._offset):
            self._hint_clear = self._offset + len(text)
            return
        # only the detectors that may begin at p can match or be open there
        key = text[p - 1 : p + 1] if p else text[0]
        dets = (self._starting.get(key) or self._tables.at(key))[1]
        det = self._open_det
        if det is not None and self._open_abs == base:
            # det is open at p, so the loop below stops at it at the latest:
            # first see whether a detector before it may stop it earlier
            rank, probe = self._tables.rank, self._probe
            k = rank[det]
            if not any(probe[d].match(text, p) for d in dets if rank[d] < k):
                # det.match_at, then det.committable, but not validating a
                # match that could not be committed anyway
                m = det.pattern.match(text, p)
                if m is not None and det.commit is not None and det.commit(m):
                    span = det.validate(m)
                    if span is not None:
                        self._commit_early(det, forced=False, label_end=span[0])
                return
        for det in dets:
            hit = det.match_at(text, p)
            if hit is not None:
                if det.committable(text, hit):
                    self._commit_early(det, forced=False, label_end=hit.redact_start)
                return
            if det.open_at(text, p):
                return  # a rule listed earlier may still match here

    def _commit_early(self, det: Detector, *, forced: bool, label_end: int) -> None:
        """Send the replacement for the candidate at _pos now (after its label,
        text[_pos:label_end]) and swallow the candidate until it is complete.
        A candidate that starts inside text a replacement already covers gets
        no second one."""
        rule = det.rule
        if self.policy.action(rule) == "block":
            self._blocked = True
            self._actions.append(("blocked", rule))
            return
        self._emit(self._pos, label_end)
        if self._pos >= self._hidden:
            self._out.append(self.policy.replacement(rule))
            self._actions.append(("redacted", rule))
        self._commit = (det, forced)
        self._forced_end = len(self._text)
        if forced:
            self._swallow_if_certain(det)
        elif det.extend is not None and det.open_at(self._text, self._pos):
            self._swallowed = _Swallowed(det.extend, self._text[self._pos :])

    def _swallow_if_certain(self, det: Detector) -> None:
        """Swallow a forced candidate once it is a certain match (before, it
        is short: a candidate that may grow without end is a certain match)."""
        if det.extend is None or det.commit is None:
            return
        text, pos = self._text, self._pos
        m = det.pattern.match(text, pos)
        if m is not None and det.commit(m) and det.validate(m) is not None:
            self._swallowed = _Swallowed(det.extend, text[pos:])

    def _swallow(self, chunk: str, now: float) -> None:
        """Take a chunk of the committed candidate, looking at the chunk and
        a bounded look-back only, until the candidate is complete."""
        sw = self._swallowed
        assert sw is not None
        received = self._offset + len(self._text) + sw.size  # absolute end so far
        if self._timed:
            self._arrivals.append((received, now))
        sw.chunks.append(chunk)
        sw.size += len(chunk)
        window = sw.window
        seen = window + chunk
        stop = sw.extend(seen, len(window), sw.whole)
        if stop is None:
            if len(seen) > EXTEND_CONTEXT:
                sw.window = seen[-EXTEND_CONTEXT:]
                sw.whole = False
            else:
                sw.window = seen
            return
        self._unswallow()
        self._advance(final=False, open_end=received - len(window) + stop - self._offset)

    def _unswallow(self) -> None:
        sw = self._swallowed
        assert sw is not None
        self._text += "".join(sw.chunks)
        self._swallowed = None

    def _forced_cover(self, det: Detector, final: bool, open_end: int | None) -> int:
        """Where the text a forced replacement stands for ends: all that was
        held when it was sent, then the candidate for as long as it stayed
        open (less trailing spaces and punctuation), and anything that looked
        like a match there even if it did not validate (a Luhn-invalid
        number): the rest of a non-match is not shown after its marker.
        ``open_end``: where the candidate stopped being open, when known."""
        text, pos = self._text, self._pos
        end = len(text)
        if open_end is not None:
            end = max(self._forced_end, open_end)
        elif not final:
            end = self._forced_end
            for n in range(len(text) - 1, self._forced_end, -1):
                if det.open_at(text, pos, n):
                    end = n
                    break
        while end > self._forced_end and text[end - 1] in _TRAILING:
            end -= 1
        for d in self._dets:
            m = d.pattern.match(text, pos)
            if m is not None:
                end = max(end, m.end())
        return end

    def _enforce_limits(self, now: float) -> None:
        if self._blocked or self._commit is not None:
            return
        start = max(self._pos, self._hidden)
        held = len(self._text) - start
        if held <= 0:
            return
        if held <= self.holdback_chars and (
            not self._timed
            or (now - self._arrival(self._offset + start)) * 1000.0 < self.holdback_ms
        ):
            return
        self._force_early()

    def _force_early(self) -> None:
        """A limit is reached: redact the candidate at once if it shows evidence."""
        text = self._text
        for det in self._dets:
            evidence = det.evidence_at(text, self._pos)
            if evidence is not None and det.open_at(text, self._pos):
                label = "secret" in evidence.re.groupindex
                label_end = evidence.start("secret") if label else self._pos
                self._commit_early(det, forced=True, label_end=label_end)
                return

    def _arrival(self, absolute: int) -> float:
        arrivals = self._arrivals
        while len(arrivals) > 1 and arrivals[1][0] <= absolute:
            arrivals.popleft()
        return arrivals[0][1] if arrivals else math.inf

    def _trim(self) -> None:
        self._arrival(self._offset + max(self._pos, self._hidden))  # forget older chunks
        if self._pos - _CONTEXT >= 64:
            self._cut(self._pos - _CONTEXT)

    def _cut(self, cut: int) -> None:
        """Drop the first ``cut`` characters of _text (released long ago)."""
        self._text = self._text[cut:]
        self._offset += cut
        self._pos -= cut
        self._hidden = max(0, self._hidden - cut)
        self._forced_end = max(0, self._forced_end - cut)
