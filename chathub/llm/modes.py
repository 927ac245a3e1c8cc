"""Modes: how a session's replies are shaped. A mode is data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    system_prompt: str
    temperature: float = 0.7
    max_output_tokens: int = 512
    context_budget: int = 3072
    extraction: bool = True


SHIPPED: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode(
            "chat",
            "You are a helpful, concise assistant for a team. Answer clearly and "
            "say when you are unsure.",
        ),
        Mode(
            "plan",
            "You help a team plan work. Turn goals into concrete tasks with an "
            "owner and a due date when they are known, and list open questions.",
            temperature=0.4,
        ),
        Mode(
            "reflect",
            "You help a team reflect. Point out patterns, risks and insights in "
            "what they describe, and ask one good question back.",
        ),
        Mode(
            "summarise",
            "You summarise conversations faithfully and briefly: decisions, tasks "
            "with owners, open questions. Do not invent anything.",
            temperature=0.2,
            extraction=False,
        ),
    )
}


def get_mode(name: str) -> Mode | None:
    return SHIPPED.get(name)
