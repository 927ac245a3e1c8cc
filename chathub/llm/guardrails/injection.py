"""Prompt-injection heuristics for user input. Pure.

Each marker is a phrase typical of an attempt to override the system prompt;
it adds its weight to the text's score once, however often it occurs. A score
at or above the policy's ``injection_threshold`` (1.0 by default) makes the
markers ``prompt_injection`` findings. A single strong marker ("ignore all
previous instructions") reaches the threshold alone; weak ones ("you are now",
"pretend to be") only together, which keeps ordinary role-play requests out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chathub.llm.guardrails.detectors import Finding

_PREVIOUS = r"(?:previous|prior|above|earlier|preceding|initial|original|system)"
_ORDERS = r"(?:instructions?|prompts?|rules?|directions?|guidelines?|messages?|context)"

#: (name, pattern, weight)
MARKERS: tuple[tuple[str, re.Pattern[str], float], ...] = tuple(
    (name, re.compile(pattern, re.I), weight)
    for name, pattern, weight in (
        (
            "ignore_previous",
            rf"\b(?:ignore|disregard|forget|override|bypass)\s+(?:all\s+|any\s+|every\s+)?"
            rf"(?:(?:the|your|my|of\s+the|these|those)\s+)?{_PREVIOUS}\s+{_ORDERS}",
            1.0,
        ),
        (
            "disregard_above",
            r"\b(?:disregard|ignore|forget)\s+(?:(?:everything|all|anything)\s+)?"
            r"(?:(?:the|that|what\s+(?:is|was))\s+)?(?:(?:said|written|stated)\s+)?"
            r"(?:above|before\s+this|so\s+far)\b",
            1.0,
        ),
        ("system_prompt_label", r"(?:^|\n|\b)(?:system\s+prompt|system\s+message)\s*:", 1.0),
        (
            "reveal_prompt",
            r"\b(?:reveal|show|print|repeat|output|leak|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+"
            r"(?:system\s+prompt|hidden\s+(?:instructions|prompt)|initial\s+instructions)",
            1.0,
        ),
        ("chat_template_tokens", r"<\|?/?(?:im_start|im_end|system)\|?>|\[/?INST\]", 1.0),
        ("new_instructions", r"\bnew\s+(?:instructions|rules)\s*:", 0.6),
        ("dan", r"\b(?:DAN|do\s+anything\s+now)\b", 0.7),
        ("developer_mode", r"\b(?:developer|god|jailbreak|unrestricted)\s+mode\b", 0.7),
        ("jailbreak", r"\bjailbr(?:eak|oken)\b", 0.5),
        ("you_are_now", r"\byou\s+are\s+(?:now|no\s+longer)\b", 0.5),
        (
            "no_restrictions",
            r"\b(?:no|without(?:\s+any)?)\s+(?:restrictions|filters|limitations|guidelines|"
            r"censorship|rules)\b",
            0.4,
        ),
        ("pretend", r"\b(?:pretend\s+(?:to\s+be|you\s+are)|act\s+as\s+(?:if|an?|the))\b", 0.3),
        ("roleplay", r"\brole[\s-]?play\b", 0.3),
    )
)


@dataclass(frozen=True, slots=True)
class InjectionScore:
    score: float
    #: one finding per marker that occurred (its first occurrence)
    findings: tuple[Finding, ...]


# Characters that show nothing (zero-width spaces and joiners, the soft
# hyphen, word joiners, directional marks, the BOM): "ign\u00adore previous
# instructions" reads as the marker, so the markers are looked for without them.
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def _visible(text: str) -> tuple[str, list[int] | None]:
    """``text`` without invisible characters, and for each of its
    characters where it is in ``text`` (None when there were none)."""
    if _INVISIBLE.search(text) is None:
        return text, None
    where = [i for i, ch in enumerate(text) if not _INVISIBLE.fullmatch(ch)]
    return "".join(text[i] for i in where), where


def score_injection(text: str) -> InjectionScore:
    """The markers found in ``text`` (invisible characters inside them
    ignored) and their total weight; each finding's span is in ``text``."""
    visible, where = _visible(text)
    findings: list[Finding] = []
    score = 0.0
    for _name, pattern, weight in MARKERS:
        m = pattern.search(visible)
        if m is not None:
            score += weight
            start, end = m.span()
            if where is not None:
                start, end = where[start], where[end - 1] + 1
            findings.append(Finding("prompt_injection", (start, end), text[start:end]))
    findings.sort(key=lambda f: f.span)
    return InjectionScore(round(score, 3), tuple(findings))
