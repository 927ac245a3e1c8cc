"""The fake wires themselves: what other test modules rely on."""

from __future__ import annotations

import anthropic
from anthropic.types import MessageParam, UserMessageParam

from tests.fakewire.anthropic_server import AnthropicWire, TextReply, ToolUseReply


async def test_anthropic_wire_answers_non_streamed_requests_too(
    anthropic_wire: AnthropicWire,
) -> None:
    anthropic_wire.enqueue(
        TextReply(["Hi", " there"], output_tokens=2),
        ToolUseReply("pick", ['{"n": ', "1}"]),
    )
    client = anthropic.AsyncAnthropic(api_key="k", base_url=anthropic_wire.base_url, max_retries=0)
    try:
        messages: list[MessageParam] = [UserMessageParam(role="user", content="hello")]
        text = await client.messages.create(model="m", max_tokens=8, messages=messages)
        tool = await client.messages.create(model="m", max_tokens=8, messages=messages)
    finally:
        await client.close()
    assert text.content[0].type == "text" and text.content[0].text == "Hi there"
    assert (text.usage.input_tokens, text.usage.output_tokens) == (11, 2)
    assert tool.content[0].type == "tool_use" and tool.content[0].input == {"n": 1}
    assert [r.body["messages"] for r in anthropic_wire.requests] == [messages, messages]


def test_reset_forgets_the_script_and_the_record(anthropic_wire: AnthropicWire) -> None:
    anthropic_wire.enqueue(TextReply(["x"]))
    anthropic_wire.token_count = 3
    anthropic_wire.default = TextReply(["y"])
    anthropic_wire.reset()
    assert not anthropic_wire.replies
    assert anthropic_wire.token_count is None
    assert anthropic_wire.default == TextReply()
