"""Modes: how a session's replies are shaped. A mode is data.

The shipped modes live in ``modes.toml`` beside this module; teams add their
own (stored in the database, managed over REST) with the same fields. A mode
may declare a ``flow``: steps run in order, each but the last answering with
structured data (its ``schema``) that is handed to the next; only the last
step streams to the user.
"""

from __future__ import annotations

import tomllib
from functools import cache, lru_cache
from importlib import resources
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from chathub.client_json import find_problem
from chathub.llm.guardrails import Policy, PolicyError

MODE_NAME = r"^[a-z][a-z0-9_-]{0,63}$"


def _json_document(value: dict[str, Any]) -> dict[str, Any]:
    """A mode's free-form document (its guardrails, a step's schema) is
    stored, hashed and sent to providers as JSON: it must be JSON that
    orjson writes. Its errors are TypeErrors, which pydantic would let
    through as a crash rather than report, hence the ValueError."""
    problem = find_problem(value)
    if problem is not None:
        raise ValueError(problem)
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"not writable as JSON: {exc}") from exc
    return value


JsonDocument = Annotated[dict[str, Any], AfterValidator(_json_document)]


class FlowStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    prompt: Annotated[str, Field(min_length=1, max_length=20_000)]
    output_schema: JsonDocument | None = Field(default=None, alias="schema")


class Mode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=MODE_NAME)]
    description: Annotated[str, Field(max_length=500)] = ""
    system_prompt: Annotated[str, Field(min_length=1, max_length=20_000)]
    provider: Annotated[str, Field(max_length=500)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    max_output_tokens: Annotated[int, Field(ge=16, le=32_000)] = 1024
    context_budget: Annotated[int, Field(ge=512, le=1_000_000)] = 8192
    guardrails: JsonDocument = Field(default_factory=dict)
    extraction: bool = True
    flow: Annotated[list[FlowStep], Field(max_length=8)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _flow_shape(self) -> Mode:
        try:
            mode_policy(self)
        except PolicyError as exc:
            raise ValueError(f"guardrails: {exc}") from exc
        if self.flow:
            *structured, last = self.flow
            if any(step.output_schema is None for step in structured):
                raise ValueError("every flow step but the last needs a schema")
            if last.output_schema is not None:
                raise ValueError("the last flow step streams text: it has no schema")
            if len({step.name for step in self.flow}) != len(self.flow):
                raise ValueError("flow step names must be unique")
        if self.max_output_tokens >= self.context_budget:
            raise ValueError("max_output_tokens must be below context_budget")
        return self

    @property
    def steps(self) -> list[str]:
        return [step.name for step in self.flow] or ["answer"]


@cache
def shipped_modes() -> dict[str, Mode]:
    raw = tomllib.loads(resources.files("chathub.llm").joinpath("modes.toml").read_text())
    return {name: Mode(name=name, **spec) for name, spec in raw.items()}


def mode_policy(mode: Mode) -> Policy:
    """The mode's guardrail policy (its ``guardrails`` document over the
    defaults); built once per distinct document."""
    return _policy(orjson.dumps(mode.guardrails, option=orjson.OPT_SORT_KEYS))


@lru_cache(maxsize=256)
def _policy(document: bytes) -> Policy:
    return Policy.from_dict(orjson.loads(document))


def get_mode(name: str) -> Mode | None:
    """A shipped mode by name (team modes are looked up in storage first)."""
    return shipped_modes().get(name)
