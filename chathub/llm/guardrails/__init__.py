"""Guardrails: PII/secret detection, blocked phrases and prompt-injection
heuristics on the way in; a streaming hold-back filter on the way out. Pure
functions over text; the reply task and the message handler call them.

    detectors   patterns, validators (Luhn, mod-97, entropy), prefix shapes
    injection   scored prompt-injection markers
    policy      Policy: per rule allow | redact | block, replacements, blocklist
    input       check_input(text, policy) -> InputVerdict
    holdback    HoldbackFilter (streaming) and redact_all (whole text)
"""

from __future__ import annotations

from chathub.llm.guardrails.detectors import RULES, Finding, detect
from chathub.llm.guardrails.holdback import FilterOutput, HoldbackFilter, redact_all
from chathub.llm.guardrails.injection import InjectionScore, score_injection
from chathub.llm.guardrails.input import InputVerdict, check_input
from chathub.llm.guardrails.policy import (
    DEFAULT_SAFE_MESSAGE,
    POLICY_RULES,
    Action,
    Policy,
    PolicyError,
    RulePolicy,
)
from chathub.llm.guardrails.validators import iban_ok, luhn_ok

__all__ = [
    "DEFAULT_SAFE_MESSAGE",
    "POLICY_RULES",
    "RULES",
    "Action",
    "FilterOutput",
    "Finding",
    "HoldbackFilter",
    "InjectionScore",
    "InputVerdict",
    "Policy",
    "PolicyError",
    "RulePolicy",
    "check_input",
    "detect",
    "iban_ok",
    "luhn_ok",
    "redact_all",
    "score_injection",
]
