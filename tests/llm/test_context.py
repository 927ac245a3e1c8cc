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


async def test_the_summary_is_in_the_system_part_and_file_excerpts_open_the_users_turn() -> None:
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
    # Attached text is the user's data, not the operator's instructions.
    assert "notes.txt" not in system and "alpha" not in system
    last = built.request.turns[-1]
    assert last.role == "user" and last.content.endswith("\n\nand the newest question?")
    assert last.content.index("notes.txt") < last.content.index("old.txt")
    assert "alpha " * 16 in last.content and "alpha " * 17 not in last.content
    assert built.dropped == 0


async def test_files_are_dropped_before_the_users_turn_is_cut() -> None:
    files = [FileExcerpt(f"f{i}.txt", "word " * 200) for i in range(5)]
    built = await build_prompt(
        CHAT, [HistoryItem("user", "short question")], files=files, window=2048
    )
    assert built.input_tokens <= input_budget(CHAT, 2048)
    last = built.request.turns[-1].content
    assert last.endswith("\n\nshort question")
    assert "f0.txt" in last and "f4.txt" not in last


async def test_many_large_attachments_keep_the_question_whole_and_as_many_files_as_fit() -> None:
    """Twenty files of 4,000 characters: the newest that fit are sent, then
    the history that fits, and the user's question is never cut."""
    question = "Please compare these reports and list the differences between them. END"
    history = [*conversation(6)[:-1], HistoryItem("user", question)]
    files = [FileExcerpt(f"report-{i:02}.txt", f"report {i} " * 400) for i in range(20)]
    budget = input_budget(CHAT, None)
    built = await build_prompt(CHAT, history, files=files)
    assert built.input_tokens <= budget
    last = built.request.turns[-1].content
    assert last.endswith("\n\n" + question)
    sent = [f.name for f in files if f"--- {f.name} (excerpt) ---" in last]
    assert sent == [f.name for f in files[: len(sent)]]  # the newest, in order
    assert len(sent) >= 5, sent
    # what was left out would not have fitted
    assert built.input_tokens + 1000 > budget


async def test_a_denser_counter_drops_several_files_at_once_and_keeps_the_question() -> None:
    async def dense(request: CompletionRequest) -> int:
        return 3 * await estimate_counter(request)

    question = "What changed between the drafts? END"
    files = [FileExcerpt(f"draft-{i}.txt", f"draft {i} " * 400) for i in range(20)]
    built = await build_prompt(CHAT, [HistoryItem("user", question)], files=files, count=dense)
    assert built.input_tokens <= input_budget(CHAT, None)
    last = built.request.turns[-1].content
    assert last.endswith(question)
    assert "draft-0.txt" in last
