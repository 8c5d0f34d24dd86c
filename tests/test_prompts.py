"""How stored items become the model's messages: tool calls and their results included."""

from __future__ import annotations

from assistant.engine.request import ChatMessage, TextChunk
from assistant.items import ContentPart, Item
from assistant.prompts import build_messages


def text_of(message: ChatMessage) -> str:
    return "".join(part.text for part in message.parts if isinstance(part, TextChunk))


def test_tool_calls_and_results_are_rendered_as_the_model_writes_and_reads_them() -> None:
    items = [
        Item("a", "user", (ContentPart("input_text", text="Weather and time in Paris?"),)),
        Item("b", "assistant", type="function_call", call_id="c1", name="get_weather", arguments='{"city":"Paris"}'),
        Item("c", "assistant", type="function_call", call_id="c2", name="get_time", arguments="{}"),
        Item("d", "user", type="function_call_output", call_id="c1", output="21 C"),
        Item("e", "user", type="function_call_output", call_id="c2", output="noon"),
        Item("f", "assistant", (ContentPart("output_text", text="It is 21 C at noon."),)),
    ]
    messages = build_messages("Be brief.", items)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert text_of(messages[2]) == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert text_of(messages[3]) == "<tool_response>\n21 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"


def test_empty_assistant_messages_are_left_out() -> None:
    items = [Item("a", "user", (ContentPart("input_text", text="Hi"),)), Item("b", "assistant", (), "incomplete")]
    assert [m.role for m in build_messages("", items)] == ["user"]
