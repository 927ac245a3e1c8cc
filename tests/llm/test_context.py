"""Prompt building within a token budget (pure, no server)."""

from __future__ import annotations

from chathub.llm.base import CompletionRequest
from chathub.llm.context import (
    FileExcerpt,
    HistoryItem,
    build_prompt,
    estimate_counter,
    input_budget,
)
from chathub.llm.modes import get_mode

CHAT = get_mode("chat")
assert CHAT is not None


def conversation(turns: int) -> list[HistoryItem]:
    items = []
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        items.append(
            HistoryItem(role, f"turn {i}: " + "lorem ipsum dolor sit amet " * 8, f"m{i:04}")
        )
    items.append(HistoryItem("user", "and the newest question?", "m9999"))
    return items


async def test_a_500_turn_session_stays_within_budget_and_keeps_the_newest() -> None:
    history = conversation(500)
    built = await build_prompt(CHAT, history, window=4096)
    budget = input_budget(CHAT, 4096)
    assert built.input_tokens <= budget
    assert await estimate_counter(built.request) == built.input_tokens
    assert built.request.turns[-1].content == "and the newest question?"
    assert built.request.turns[0].role == "user"
    kept = [t.content for t in built.request.turns]
    # contiguous newest turns: the oldest kept is newer than every dropped one
    assert built.sent + built.dropped == len(history)
    assert built.dropped > 400
    assert (
        history[-built.sent].content.split(":")[0] in kept[0]
        or built.request.turns[0].role == "user"
    )
    assert all(
        t.role != u.role for t, u in zip(built.request.turns, built.request.turns[1:], strict=False)
    )


async def test_the_providers_counter_has_the_last_word() -> None:
    async def pessimistic(request: CompletionRequest) -> int:
        return 3 * await estimate_counter(request)  # e.g. a tokenizer far denser than 4 chars

    history = conversation(200)
    built = await build_prompt(CHAT, history, window=4096, count=pessimistic)
    assert built.input_tokens <= input_budget(CHAT, 4096)
    assert built.input_tokens == await pessimistic(built.request)
    assert built.request.turns[-1].content == "and the newest question?"


async def test_one_huge_message_is_cut_to_fit() -> None:
    history = [HistoryItem("user", "x" * 200_000 + " the end")]
    built = await build_prompt(CHAT, history, window=2048)
    assert built.input_tokens <= input_budget(CHAT, 2048)
    assert built.request.turns[-1].content.endswith("the end")


async def test_summary_and_file_excerpts_come_first_and_files_are_cut() -> None:
    files = [FileExcerpt("notes.txt", "alpha " * 5000), FileExcerpt("old.txt", "beta")]
    built = await build_prompt(
        CHAT,
        conversation(4),
        summary="We agreed on X.",
        files=files,
        window=8192,
        excerpt_chars=100,
    )
    system = built.request.system
    assert system.startswith(CHAT.system_prompt)
    assert "We agreed on X." in system
    assert system.index("notes.txt") < system.index("old.txt")
    assert "alpha " * 16 in system and "alpha " * 17 not in system
    assert built.dropped == 0


async def test_files_are_dropped_before_the_users_turn_is_cut() -> None:
    files = [FileExcerpt(f"f{i}.txt", "word " * 200) for i in range(5)]
    built = await build_prompt(
        CHAT, [HistoryItem("user", "short question")], files=files, window=2048
    )
    assert built.input_tokens <= input_budget(CHAT, 2048)
    assert built.request.turns[-1].content == "short question"
    assert "f0.txt" in built.request.system and "f4.txt" not in built.request.system
