"""Building the prompt of a reply from the session's history. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chathub.llm.base import ChatTurn, CompletionRequest, Role
from chathub.llm.modes import Mode


@dataclass(frozen=True)
class HistoryItem:
    role: str
    content: str


def estimate_tokens(text: str) -> int:
    """A provider-independent estimate: about four characters per token."""
    return (len(text) + 3) // 4


def build_request(
    mode: Mode, history: Sequence[HistoryItem], *, model: str | None = None
) -> CompletionRequest:
    """The newest turns that fit the mode's budget, oldest first, starting
    with a user turn and never two turns of one role in a row."""
    budget = mode.context_budget - estimate_tokens(mode.system_prompt) - mode.max_output_tokens
    picked: list[ChatTurn] = []
    used = 0
    for item in reversed(history):
        if item.role not in ("user", "assistant") or not item.content:
            continue
        cost = estimate_tokens(item.content) + 4
        if picked and used + cost > budget:
            break
        used += cost
        role: Role = "user" if item.role == "user" else "assistant"
        if picked and picked[-1].role == role:
            picked[-1] = ChatTurn(role, item.content + "\n\n" + picked[-1].content)
        else:
            picked.append(ChatTurn(role, item.content))
    picked.reverse()
    while picked and picked[0].role != "user":
        picked.pop(0)
    return CompletionRequest(
        turns=picked,
        system=mode.system_prompt,
        model=model,
        temperature=mode.temperature,
        max_tokens=mode.max_output_tokens,
    )
