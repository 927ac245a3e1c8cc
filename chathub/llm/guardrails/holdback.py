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
   the whole text, whatever the chunking and the timing. Released text never
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
   body characters, ``label=`` and 8 value characters, ``-----BEGIN``), it is
   **redacted conservatively**: the rule's replacement is sent at once and
   the candidate swallowed until it is complete. If it turns out a real
   match, the output is the same as in 1.; if not (a Luhn-invalid number,
   an address without a top-level domain) what it swallowed stays
   redacted: over-redaction, never a leak. A candidate *without* evidence
   (a partial word, a short number, the start of a label or of a blocked
   phrase) is never released early, since that could show the first
   characters of a secret: it waits for the next chunk or ``flush``, past
   the limits. Such a candidate is at most 64 characters (an e-mail local
   part) or the longest blocked phrase.

   Open candidates are short in practice: the longest possible are an
   e-mail before its domain shows a top-level domain (132 characters), a
   generic ``label: value`` (53), an IBAN (65), a phone number (49), a
   card number (38). A match that is certain before it ends (an e-mail, a
   prefixed API key, a generic secret of 32+ characters, a private-key
   block) is *committed*: its replacement is sent as soon as it is certain
   and the rest swallowed as it arrives, so it holds nothing visible however
   long it grows. Hence with ``holdback_chars`` >= 132 only ``holdback_ms``
   can force an early redaction, and with ``holdback_ms=math.inf`` as well,
   1. always holds.
4. **Sentences.** No pattern spans the end of a sentence (``.``, ``!`` or
   ``?`` then a space), so no text is held across one (a private-key block,
   which is swallowed anyway, and a blocked phrase containing such
   punctuation aside).
5. **Block.** A finding whose rule is ``block`` ends the output: it holds
   the text before the blocked span, ``blocked`` is true, the ``actions``
   end with ``("blocked", rule)``, and every later call returns nothing. The
   caller stops the stream and sends ``policy.safe_message``.

Cost: a ``feed`` looks at the held text and the new chunk only (the released
text is dropped but for a few characters of look-behind context), with one
combined regex for "may anything start here" before asking each detector.
"""

from __future__ import annotations

import functools
import math
import re
from collections import deque
from dataclasses import dataclass

from chathub.llm.guardrails.detectors import Detector, Hit, scan
from chathub.llm.guardrails.policy import Policy

#: Released characters kept before the unreleased text, for look-behinds.
_CONTEXT = 8
#: The shortest text a committable match can have ("a@b.co").
_COMMIT_MIN = 6
#: Not part of a forced replacement when they end the candidate.
_TRAILING = frozenset(" \t\n.,;:!?-()'\"")
#: Every committable match contains one of these.
_COMMIT_HINT = re.compile(r"[@\-_:=]")


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


@functools.lru_cache(maxsize=64)
def _unions(detectors: tuple[Detector, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """One regex for "some pattern may match here" and one for "some tail may
    be open here": cheap first looks before asking each detector."""
    if not detectors:
        never = re.compile("(?!)")
        return never, never
    # group names repeat across detectors, and the unions need none
    strip = functools.partial(re.sub, r"\(\?P<\w+>", "(?:")
    any_match = "|".join(strip(_scoped(d.pattern)) for d in detectors)
    any_tail = "|".join(strip(_scoped(d.tail)) for d in detectors)
    return re.compile(any_match), re.compile(any_tail)


class HoldbackFilter:
    """Redacts or blocks patterns in a stream of text chunks; see the module
    docstring for what is guaranteed.

    ``now`` is a monotonic clock in seconds. Use one filter per reply: ``feed``
    each chunk, ``poll`` when no chunk came for a while, ``flush`` at the end.
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
        self._dets = policy.detectors
        self._any_match, self._any_tail = _unions(self._dets)
        # which detector is open is checked most often for words and numbers
        self._open_order = sorted(self._dets, key=lambda d: d.rule not in ("email", "phone"))
        # _text = up to _CONTEXT released characters, then the unreleased text
        self._text = ""
        self._offset = 0  # absolute position of _text[0]
        self._pos = 0  # where the unreleased text begins
        self._hidden = 0  # text before this was covered by a replacement sent early
        # a candidate at _pos whose replacement went out early (forced: by a limit)
        self._commit: tuple[Detector, bool] | None = None
        self._forced_end = 0  # text length when a limit forced the replacement
        self._arrivals: deque[tuple[int, float]] = deque()  # (absolute start, time)
        self._out: list[str] = []
        self._actions: list[tuple[str, str]] = []
        self._blocked = False
        self._finished = False

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def held(self) -> int:
        """Characters received but neither sent nor covered by a replacement."""
        if self._commit is not None:
            return 0
        return max(0, len(self._text) - max(self._pos, self._hidden))

    def feed(self, chunk: str, now: float) -> FilterOutput:
        if self._finished:
            raise RuntimeError("feed after flush")
        if self._blocked:
            return FilterOutput(blocked=True)
        if chunk:
            if self.holdback_ms != math.inf:
                self._arrivals.append((self._offset + len(self._text), now))
            self._text += chunk
            self._advance(final=False)
        self._enforce_limits(now)
        return self._take()

    def poll(self, now: float) -> FilterOutput:
        """Time-based release when no chunk arrives (see guarantee 3.)."""
        if self._finished or self._blocked:
            return FilterOutput(blocked=self._blocked)
        self._enforce_limits(now)
        return self._take()

    def flush(self, now: float) -> FilterOutput:
        """End of stream: release or redact everything still held."""
        if self._finished or self._blocked:
            self._finished = True
            return FilterOutput(blocked=self._blocked)
        self._finished = True
        self._advance(final=True)
        return self._take()

    # -- internals ----------------------------------------------------------------

    def _take(self) -> FilterOutput:
        if not self._out and not self._actions and not self._blocked:
            return _NOTHING
        out = FilterOutput("".join(self._out), tuple(self._actions), self._blocked)
        self._out.clear()
        self._actions.clear()
        return out

    def _advance(self, *, final: bool) -> None:
        if self._commit is not None:
            det, forced = self._commit
            if not final and det.open_at(self._text, self._pos):
                return
            # The early-replaced candidate is complete. The scan below finds it
            # again (or what it really was) and sends nothing before _hidden.
            if forced:
                covered = self._forced_cover(det, final)
            else:
                hit = det.match_at(self._text, self._pos)  # certain, so it is there
                covered = self._pos + 1 if hit is None else hit.end
            self._hidden = max(self._hidden, covered)
            self._commit = None
        self._settle(final)
        if not final and not self._blocked:
            self._try_commit()
        self._trim()

    def _settle(self, final: bool) -> None:
        """Release everything before the earliest open candidate."""
        text = self._text
        p = self._pos
        while True:
            s = len(text) if final else self._earliest_open(p)
            hits: list[Hit] = []
            if s > p:
                m = self._any_match.search(text, p)
                if m is not None and m.start() < s:
                    hits = scan(self._dets, text, p, s)
            for hit in hits:
                self._emit(p, hit.start)
                p = hit.end
                if not self._apply(hit):
                    self._pos = p
                    return
            if p <= s:
                self._emit(p, s)
                self._pos = s
                return
            # a finished match ran past s, over the candidate there: go on after it

    def _earliest_open(self, pos: int) -> int:
        text = self._text
        m = self._any_tail.search(text, pos)
        while m is not None:
            i = m.start()
            for det in self._open_order:
                if det.open_at(text, i):
                    return i
            m = self._any_tail.search(text, i + 1)
        return len(text)

    def _emit(self, start: int, end: int) -> None:
        """Send raw text[start:end], less what a replacement already covers."""
        start = max(start, self._hidden)
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
        if len(text) - p < _COMMIT_MIN or p < self._hidden or not _COMMIT_HINT.search(text, p):
            return
        for det in self._dets:
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

    def _forced_cover(self, det: Detector, final: bool) -> int:
        """Where the text a forced replacement stands for ends: all that was
        held when it was sent, then the candidate for as long as it stayed
        open (less trailing spaces and punctuation), and anything that looked
        like a match there even if it did not validate (a Luhn-invalid
        number): the rest of a non-match is not shown after its marker."""
        text, pos = self._text, self._pos
        end = len(text)
        if not final:
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
        text = self._text
        start = max(self._pos, self._hidden)
        held = len(text) - start
        if held <= 0:
            return
        if held <= self.holdback_chars and (
            self.holdback_ms == math.inf
            or (now - self._arrival(self._offset + start)) * 1000.0 < self.holdback_ms
        ):
            return
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
        cut = self._pos - _CONTEXT
        if cut < 64:
            return
        self._text = self._text[cut:]
        self._offset += cut
        self._pos -= cut
        self._hidden = max(0, self._hidden - cut)
        self._forced_end = max(0, self._forced_end - cut)
