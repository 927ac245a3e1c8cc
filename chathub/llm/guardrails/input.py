"""The input guardrail: what a user message becomes before it is stored. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from chathub.llm.guardrails.detectors import Finding, scan
from chathub.llm.guardrails.injection import score_injection
from chathub.llm.guardrails.policy import Policy


@dataclass(frozen=True, slots=True)
class InputVerdict:
    """``text`` is the input with every ``redact`` finding replaced (also when
    refused, so it can be logged). ``refused`` is true when a finding's rule is
    ``block``; ``reason`` is then that rule's name (the first in the text)."""

    text: str
    findings: tuple[Finding, ...]
    refused: bool
    reason: str | None
    injection_score: float
    #: (action, rule) pairs: ``redacted`` or ``blocked``, in text order
    actions: tuple[tuple[str, str], ...]


def check_input(text: str, policy: Policy) -> InputVerdict:
    findings = [
        Finding(h.detector.rule, (h.redact_start, h.end), text[h.redact_start : h.end])
        for h in scan(policy.detectors, text)
    ]
    injection = score_injection(text)
    if (
        policy.action("prompt_injection") != "allow"
        and injection.score >= policy.injection_threshold
    ):
        # the markers never overlap a PII span in practice; if one does, the
        # earlier finding keeps its span and the later one is dropped
        taken = [f.span for f in findings]
        for marker in injection.findings:
            if all(marker.span[1] <= a or marker.span[0] >= b for a, b in taken):
                findings.append(marker)
                taken.append(marker.span)
        findings.sort(key=lambda f: f.span)

    parts: list[str] = []
    actions: list[tuple[str, str]] = []
    reason: str | None = None
    pos = 0
    for f in findings:
        start, end = f.span
        action = policy.action(f.rule)
        parts.append(text[pos:start])
        if action == "redact":
            parts.append(policy.replacement(f.rule))
            actions.append(("redacted", f.rule))
        else:
            parts.append(f.text)
            actions.append(("blocked", f.rule))
            reason = reason or f.rule
        pos = end
    parts.append(text[pos:])
    return InputVerdict(
        text="".join(parts),
        findings=tuple(findings),
        refused=reason is not None,
        reason=reason,
        injection_score=injection.score,
        actions=tuple(actions),
    )
