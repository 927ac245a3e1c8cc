"""``Mode`` validation: a mode's free-form documents (its guardrails, a flow
step's schema) are refused with a ValidationError, never a crash, when they
cannot be written as the JSON they are stored and sent as."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from chathub.client_json import MAX_DEPTH
from chathub.llm.modes import Mode


def deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def mode(**fields: Any) -> Mode:
    return Mode(name="m", system_prompt="p", **fields)


def flow(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "frame", "prompt": "p", "schema": schema}, {"name": "answer", "prompt": "q"}]


@pytest.mark.parametrize(
    ("fields", "where", "why"),
    [
        ({"guardrails": deep(300)}, "guardrails", "nested deeper"),
        ({"guardrails": {"rules": deep(MAX_DEPTH)}}, "guardrails", "nested deeper"),
        ({"guardrails": {"blocklist": ["\ud800"]}}, "guardrails", "surrogates"),
        ({"guardrails": {"injection_threshold": 10**400}}, "guardrails", "64-bit"),
        ({"guardrails": {"blocklist": ["a\x00"]}}, "guardrails", "blocklist[0]: contains a NUL"),
        ({"flow": flow(deep(300))}, "flow.0.schema", "nested deeper"),
        ({"flow": flow({"enum": ["\udfff"]})}, "flow.0.schema", "surrogates"),
        ({"flow": flow({"maximum": -(2**64)})}, "flow.0.schema", "64-bit"),
    ],
    ids=[
        "guardrails-300-deep",
        "guardrails-just-too-deep",
        "guardrails-surrogate",
        "guardrails-huge-int",
        "guardrails-nul",
        "schema-300-deep",
        "schema-surrogate",
        "schema-huge-int",
    ],
)
def test_documents_that_cannot_be_written_are_validation_errors(
    fields: dict[str, Any], where: str, why: str
) -> None:
    with pytest.raises(ValidationError) as info:
        mode(**fields)
    [error] = info.value.errors()
    assert ".".join(map(str, error["loc"])) == where
    assert why in error["msg"], error["msg"]


def test_documents_within_the_limits_are_kept() -> None:
    schema = deep(MAX_DEPTH)
    made = mode(flow=flow(schema), guardrails={"blocklist": ["ünïcode"]})
    assert made.flow[0].output_schema == schema
    dumped = made.model_dump(mode="json", by_alias=True)
    assert Mode.model_validate(dumped) == made
