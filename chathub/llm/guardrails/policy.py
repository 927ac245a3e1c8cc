"""Guardrail policies: data saying, per rule, what to do with a finding.

A policy maps each rule to an action: ``allow`` (the rule is off), ``redact``
(replace the span with the rule's replacement) or ``block`` (refuse the input,
or stop the reply and send ``safe_message`` instead). Policies are per mode and
come from data, so :meth:`Policy.from_dict` validates everything it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from chathub.llm.guardrails.detectors import RULES, Detector, build_detectors, normalise_phrase

Action = Literal["allow", "redact", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "redact", "block")
#: Every rule a policy has an action for: the detectors' and the input-only one.
POLICY_RULES: tuple[str, ...] = (*RULES, "prompt_injection")
DEFAULT_REPLACEMENT = "[redacted:{rule}]"
DEFAULT_SAFE_MESSAGE = "Sorry, I can't continue this reply: it went against the content policy."
MAX_PHRASE_CHARS = 100

_DEFAULT_ACTIONS: dict[str, Action] = {
    "email": "redact",
    "phone": "redact",
    "card": "redact",
    "iban": "redact",
    "api_key": "redact",
    "private_key": "redact",
    "blocklist": "block",
    "prompt_injection": "block",
}


class PolicyError(ValueError):
    """A policy document that does not describe a valid policy."""


@dataclass(frozen=True)
class RulePolicy:
    action: Action
    replacement: str


@dataclass(frozen=True)
class Policy:
    """``rules`` holds an entry for every name in :data:`POLICY_RULES`."""

    rules: Mapping[str, RulePolicy]
    blocklist: tuple[str, ...] = ()
    safe_message: str = DEFAULT_SAFE_MESSAGE
    #: prompt-injection score from which the input is flagged (see ``injection``)
    injection_threshold: float = 1.0
    detectors: tuple[Detector, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [rule for rule in POLICY_RULES if rule not in self.rules]
        unknown = [rule for rule in self.rules if rule not in POLICY_RULES]
        if missing or unknown:
            raise PolicyError(f"policy rules: missing {missing}, unknown {unknown}")
        for rule, rp in self.rules.items():
            if rp.action not in ACTIONS:
                raise PolicyError(f"rule {rule!r}: action must be one of {ACTIONS}")
        if not self.injection_threshold > 0:
            raise PolicyError("injection_threshold must be positive")
        phrases = tuple(normalise_phrase(p) for p in self.blocklist)
        if any(not p or len(p) > MAX_PHRASE_CHARS for p in phrases):
            raise PolicyError(f"blocklist phrases must have 1..{MAX_PHRASE_CHARS} characters")
        object.__setattr__(self, "blocklist", phrases)
        active = [rule for rule in RULES if self.rules[rule].action != "allow"]
        object.__setattr__(self, "detectors", build_detectors(active, phrases))

    def action(self, rule: str) -> Action:
        return self.rules[rule].action

    def replacement(self, rule: str) -> str:
        return self.rules[rule].replacement

    @classmethod
    def default(cls) -> Policy:
        """Redact PII and secrets, block blocklisted phrases (none by default)
        and likely prompt injections."""
        return cls.from_dict({})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from a document like::

            {"rules": {"email": "redact",
                       "card": {"action": "block"},
                       "phone": {"action": "redact", "replacement": "[phone]"}},
             "replacement": "[redacted:{rule}]",   # default template
             "blocklist": ["forbidden phrase"],
             "safe_message": "…",
             "injection_threshold": 1.0}

        Every key is optional; rules left out keep the default action. A
        replacement may contain ``{rule}``. Raises :class:`PolicyError`.
        """
        if not isinstance(data, Mapping):
            raise PolicyError("a policy is an object")
        extra = set(data) - {
            "rules",
            "replacement",
            "blocklist",
            "safe_message",
            "injection_threshold",
        }
        if extra:
            raise PolicyError(f"unknown policy keys: {sorted(extra)}")
        template = _string(data.get("replacement", DEFAULT_REPLACEMENT), "replacement")
        given = data.get("rules", {})
        if not isinstance(given, Mapping):
            raise PolicyError("rules is an object of rule name to action")
        unknown = [name for name in given if name not in POLICY_RULES]
        if unknown:
            raise PolicyError(f"unknown rules {unknown}; known: {list(POLICY_RULES)}")
        rules: dict[str, RulePolicy] = {}
        for rule in POLICY_RULES:
            spec = given.get(rule, _DEFAULT_ACTIONS[rule])
            replacement = template
            if isinstance(spec, Mapping):
                bad = set(spec) - {"action", "replacement"}
                if bad:
                    raise PolicyError(f"rule {rule!r}: unknown keys {sorted(bad)}")
                replacement = _string(spec.get("replacement", template), f"{rule}.replacement")
                spec = spec.get("action", _DEFAULT_ACTIONS[rule])
            if spec not in ACTIONS:
                raise PolicyError(f"rule {rule!r}: action must be one of {list(ACTIONS)}")
            rules[rule] = RulePolicy(cast(Action, spec), replacement.replace("{rule}", rule))
        blocklist = data.get("blocklist", [])
        if not isinstance(blocklist, list | tuple) or not all(
            isinstance(p, str) for p in blocklist
        ):
            raise PolicyError("blocklist is a list of phrases")
        threshold = data.get("injection_threshold", 1.0)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise PolicyError("injection_threshold is a number")
        return cls(
            rules=rules,
            blocklist=tuple(blocklist),
            safe_message=_string(data.get("safe_message", DEFAULT_SAFE_MESSAGE), "safe_message"),
            injection_threshold=float(threshold),
        )

    def to_dict(self) -> dict[str, Any]:
        """A document that :meth:`from_dict` turns back into an equal policy."""
        return {
            "rules": {
                rule: {"action": rp.action, "replacement": rp.replacement}
                for rule, rp in self.rules.items()
            },
            "blocklist": list(self.blocklist),
            "safe_message": self.safe_message,
            "injection_threshold": self.injection_threshold,
        }


def _string(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{name} must be a non-empty string")
    return value
