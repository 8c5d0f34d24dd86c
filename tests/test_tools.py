"""Tools and structured output without a model: validation, prompt, grammar, and parsing answers back."""

from __future__ import annotations

import json
import random
from typing import Any

import llguidance
import pytest

from assistant.engine.request import TextChunk
from assistant.errors import MAX_QUOTED_CHARS, AssistantError
from assistant.tool_calls import (ArgumentsDelta, CallDone, CallStarted, OutputEvent, TextDelta, ToolCall,
                                  ToolCallParser, parse_output, render_tool_calls, tool_results_message)
from assistant.tools import (FunctionTool, ResponseFormat, ToolChoice, build_grammar, parse_response_format,
                             parse_tool_choice, parse_tools, tools_prompt)

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["order_id"], "properties": {
    "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}}}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": WEATHER, "strict": True}},
              {"type": "function", "function": {"name": "lookup_order", "parameters": ORDER}}]
REALTIME_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                   "parameters": WEATHER},
                  {"type": "function", "name": "handoff_to_human"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
SECOND_CALL = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "ORD-123456"}}\n</tool_call>'


def error_of(call: Any, *args: Any, **kwargs: Any) -> AssistantError:
    with pytest.raises(AssistantError) as raised:
        call(*args, **kwargs)
    return raised.value


def matches(grammar: str | None, text: str) -> bool:
    """Whether ``text`` is a complete match of ``grammar``, checked byte by byte (no tokenizer needed)."""
    assert grammar is not None
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer("byte"), grammar, log_level=0)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


# ------------------------------------------------------------------ validation


def test_both_shapes_of_tools_parse_to_the_same_records() -> None:
    chat, realtime = parse_tools(CHAT_TOOLS), parse_tools(REALTIME_TOOLS)
    assert chat[0] == FunctionTool("get_weather", "Weather in a city", {**WEATHER}, strict=True)
    assert realtime[0].parameters == chat[0].parameters
    assert realtime[1].parameters == {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(("tools", "code", "param"), [
    ("get_weather", "invalid_type", "tools"),
    ([{"type": "web_search"}], "invalid_value", "tools[0].type"),
    ([{"type": "function", "function": {}}], "missing_required_parameter", "tools[0].function.name"),
    ([{"type": "function", "name": "get weather"}], "invalid_value", "tools[0].name"),
    ([{"type": "function", "name": "a"}, {"type": "function", "name": "a"}], "invalid_value", "tools[1]"),
    ([{"type": "function", "name": "a", "parameters": {"type": "string"}}], "invalid_value", "tools[0].parameters"),
    ([{"type": "function", "name": "a", "parameters": []}], "invalid_type", "tools[0].parameters"),
    ([{"type": "function", "name": "a", "strict": "yes"}], "invalid_type", "tools[0].strict"),
    ([{"type": "function", "function": {"name": "a", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": False}}}],
     "invalid_value", "tools[0].function.parameters.required"),
    ([{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}],
     "unsupported_schema", "tools[0].function.parameters"),
    ([{"type": "function", "name": "a", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nope"}}}}],
     "unsupported_schema", "tools[0].parameters"),
])
def test_bad_tools_are_coded_errors_that_point_at_the_field(tools: Any, code: str, param: str) -> None:
    error = error_of(parse_tools, tools)
    assert (error.code, error.param) == (code, param)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"x": {"type": "x" * 300}}},
    {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)" + "b b" * 100}}},
])
def test_an_unsupported_schema_quotes_at_most_a_prefix_of_each_client_string(schema: dict[str, Any]) -> None:
    """What the fuzzing found: llguidance's message quoted a 300-character type whole."""
    error = error_of(parse_tools, [{"type": "function", "name": "a", "parameters": schema}])
    assert error.code == "unsupported_schema"
    assert "x" * (MAX_QUOTED_CHARS + 1) not in error.message and "b b" * 30 not in error.message
    assert "Invalid type" in error.message or "look-around" in error.message


def test_an_unsupported_schema_quotes_a_client_string_escaped_at_most_as_far_as_the_string_itself() -> None:
    """What the fuzzing found next (2026-11-30): llguidance quotes a string escaped as in JSON, so forty
    backslashes came out as eighty characters, which the frame the client sent holds as they are."""
    value = "\\" * 40
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": value}
    error = error_of(parse_tools, [{"type": "function", "name": "a", "parameters": schema}])
    assert error.code == "unsupported_schema"
    sent = json.dumps(value)[1:-1]  # as the client's frame holds it
    assert sent[:MAX_QUOTED_CHARS + 1] not in error.message and "Expected array for 'required'" in error.message


def test_a_schema_the_grammar_library_panics_on_is_a_coded_error() -> None:
    """What the fuzzing found next: llguidance panicked (a BaseException from Rust) cutting its message about a
    long emoji string where "required" wants an array."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": "\U0001F600" * 40}
    error = error_of(parse_tools, [{"type": "function", "name": "a", "parameters": schema}])
    assert (error.code, error.param) == ("unsupported_schema", "tools[0].parameters")
    assert "could not read it" in error.message


def test_an_unsupported_schema_says_why_without_echoing_the_grammar() -> None:
    tools = [{"type": "function", "name": "a", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)"}}}}]
    message = error_of(parse_tools, tools).message
    assert "look-around" in message and "%json" not in message and "x-guidance" not in message


@pytest.mark.parametrize(("choice", "expected"), [
    (None, ToolChoice("auto")), ("none", ToolChoice("none")), ("required", ToolChoice("required")),
    ({"type": "function", "function": {"name": "lookup_order"}}, ToolChoice("function", "lookup_order")),
    ({"type": "function", "name": "lookup_order"}, ToolChoice("function", "lookup_order")),
])
def test_tool_choice_in_either_shape(choice: Any, expected: ToolChoice) -> None:
    assert parse_tool_choice(choice, parse_tools(CHAT_TOOLS)) == expected


@pytest.mark.parametrize(("choice", "code", "param"), [
    ("sometimes", "invalid_value", "tool_choice"),
    (3, "invalid_type", "tool_choice"),
    ({"type": "function", "function": {"name": "nope"}}, "invalid_value", "tool_choice.function.name"),
    ({"type": "function", "name": "nope"}, "invalid_value", "tool_choice.name"),
    ({"type": "function"}, "missing_required_parameter", "tool_choice.name"),
])
def test_bad_tool_choice_is_a_coded_error(choice: Any, code: str, param: str) -> None:
    error = error_of(parse_tool_choice, choice, parse_tools(CHAT_TOOLS))
    assert (error.code, error.param) == (code, param)


def test_required_without_tools_is_refused_and_no_choice_without_tools_is_none() -> None:
    assert error_of(parse_tool_choice, "required", ()).param == "tool_choice"
    assert parse_tool_choice(None, ()) == ToolChoice("none")


def test_response_formats() -> None:
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ResponseFormat({"type": "object"})
    nested = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    assert parse_response_format(nested) == ResponseFormat(ORDER, "order", strict=True)
    flat = {"type": "json_schema", "name": "order", "schema": ORDER}
    assert parse_response_format(flat) == ResponseFormat(ORDER, "order")
    error = error_of(parse_response_format, {"type": "json_schema", "json_schema": {"name": "x"}})
    assert (error.code, error.param) == ("invalid_type", "response_format.json_schema.schema")
    error = error_of(parse_response_format, {"type": "yaml"})
    assert (error.code, error.param) == ("invalid_value", "response_format.type")


# ------------------------------------------------------------------ prompt and grammar


def test_the_prompt_lists_every_tool_with_its_schema_and_the_format() -> None:
    tools = parse_tools(CHAT_TOOLS)
    prompt = tools_prompt(tools, ToolChoice("auto"), parallel_tool_calls=False)
    listed = [json.loads(line) for line in prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert [entry["function"]["name"] for entry in listed] == ["get_weather", "lookup_order"]
    assert listed[0]["function"]["parameters"] == WEATHER
    assert "<tool_call>" in prompt and "plain text" in prompt and "one function at most" in prompt
    assert "must call the function lookup_order" in tools_prompt(tools, ToolChoice("function", "lookup_order"))
    assert tools_prompt(tools, ToolChoice("none")) == "" and tools_prompt((), ToolChoice("auto")) == ""


def test_auto_takes_text_or_calls_and_nothing_else() -> None:
    grammar = build_grammar(parse_tools(CHAT_TOOLS), ToolChoice("auto"))
    for text in ["", "Hello!", "It is <b>sunny</b>\n<tool_call> inside text", CALL, CALL + "\n" + SECOND_CALL]:
        assert matches(grammar, text), text
    for text in [CALL.replace("get_weather", "get_wether"), CALL.replace("celsius", "kelvin"),
                 SECOND_CALL.replace("ORD-123456", "ORD-12345"), CALL.replace(": ", ":"), CALL + "\nand text"]:
        assert not matches(grammar, text), text


def test_required_single_named_and_none() -> None:
    tools = parse_tools(CHAT_TOOLS)
    required = build_grammar(tools, ToolChoice("required"), parallel_tool_calls=False)
    assert matches(required, CALL) and not matches(required, "Hello") and not matches(required, CALL + "\n" + CALL)
    named = build_grammar(tools, ToolChoice("function", "lookup_order"))
    assert matches(named, SECOND_CALL) and not matches(named, CALL)
    assert build_grammar(tools, ToolChoice("none")) is None
    assert build_grammar((), ToolChoice("none")) is None


def test_response_format_alone_and_as_the_text_of_auto() -> None:
    schema = parse_response_format({"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}})
    alone = build_grammar((), ToolChoice("none"), response_format=schema)
    assert matches(alone, '{"order_id": "ORD-000001"}') and not matches(alone, '{"order_id": "x"}')
    with_tools = build_grammar(parse_tools(CHAT_TOOLS), ToolChoice("auto"), response_format=schema)
    assert matches(with_tools, '{"order_id": "ORD-000001"}') and matches(with_tools, CALL)
    assert not matches(with_tools, "plain text")
    any_object = build_grammar((), ToolChoice("none"), response_format=parse_response_format({"type": "json_object"}))
    assert matches(any_object, '{"a": [1, 2, {"b": null}]}') and not matches(any_object, "[1]")


# ------------------------------------------------------------------ parsing answers


def counter_ids() -> Any:
    count = iter(range(1000))
    return lambda: f"call_{next(count)}"


def chunkings(text: str) -> list[list[str]]:
    """Every fixed chunk size up to 8, one chunk, and a few random splits."""
    splits = [[text[i:i + size] for i in range(0, len(text), size)] for size in range(1, 9)] + [[text]]
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return splits


def streamed(chunks: list[str]) -> list[OutputEvent]:
    parser = ToolCallParser(counter_ids())
    events = [event for chunk in chunks for event in parser.push(chunk)]
    return events + parser.finish()


def merged(events: list[OutputEvent]) -> tuple[str, list[tuple[str, str, str]]]:
    """The text, and per call (id, name, the argument deltas joined); checks each call's events are in order."""
    text, calls, done = "", [], []
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, CallStarted):
            assert event.index == len(calls)
            calls.append([event.call_id, event.name, ""])
        elif isinstance(event, ArgumentsDelta):
            assert event.index == len(calls) - 1 and event.delta
            calls[-1][2] += event.delta
        elif isinstance(event, CallDone):
            assert event.index == len(calls) - 1 == len(done)
            assert event.call == ToolCall(*calls[-1])
            done.append(event.call)
    assert len(done) == len(calls)
    return text, [tuple(call) for call in calls]  # type: ignore[misc]


@pytest.mark.parametrize(("answer", "text", "calls"), [
    ("Hello <b>there</b>", "Hello <b>there</b>", []),
    ("<tool", "<tool", []),
    ("<tool_caller>", "<tool_caller>", []),
    ("", "", []),
    (CALL, "", [("call_0", "get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    (CALL + "\n" + SECOND_CALL, "", [("call_0", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
                                     ("call_1", "lookup_order", '{"order_id": "ORD-123456"}')]),
    ('<tool_call>\n{"name": "a", "arguments": {"s": "}\\n</tool_call"}}\n</tool_call>', "",
     [("call_0", "a", '{"s": "}\\n</tool_call"}')]),
    ('<tool_call>\n{"nom": 1}', '<tool_call>\n{"nom": 1}', []),  # not the format: no grammar held the model
    (CALL + "\n", "", [("call_0", "get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "",
     [("call_0", "get_weather", '{"city": "Par')]),  # cut short ("length"): done with what it has
    ('<tool_call>\n{"name": "get_wea', "", []),  # cut short before the name is whole: no call
])
def test_every_chunking_streams_the_same_events(answer: str, text: str, calls: list[tuple[str, str, str]]) -> None:
    for chunks in chunkings(answer) if answer else [[""]]:
        assert merged(streamed(chunks)) == (text, calls), chunks
    parsed = parse_output(answer, counter_ids())
    assert parsed.text == text and [(c.call_id, c.name, c.arguments) for c in parsed.calls] == calls


def test_arguments_stream_before_the_call_ends() -> None:
    parser = ToolCallParser(counter_ids())
    events = parser.push('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert events == [CallStarted(0, "call_0", "get_weather"), ArgumentsDelta(0, '{"city": "Pa')]
    assert parser.push('ris"') == [ArgumentsDelta(0, 'ris"')]
    assert parser.push("}") == []  # may be the start of the block's end
    assert parser.push("}\n</tool_call>") == [ArgumentsDelta(0, "}"),
                                              CallDone(0, ToolCall("call_0", "get_weather", '{"city": "Paris"}'))]


def test_call_ids_look_like_openais() -> None:
    ids = {call.call_id for call in parse_output(CALL + "\n" + CALL).calls}
    assert len(ids) == 2 and all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)


def test_earlier_calls_and_results_render_back_into_the_conversation() -> None:
    rendered = render_tool_calls([("get_weather", '{"city":"Paris","unit":"celsius"}'),
                                  ("lookup_order", '{"order_id": "ORD-123456"}')])
    assert rendered == CALL + "\n" + SECOND_CALL
    assert [c.name for c in parse_output(rendered).calls] == ["get_weather", "lookup_order"]
    message = tool_results_message(['{"temperature": 18}', "shipped"])
    assert message.role == "user" and isinstance(message.parts[0], TextChunk)
    assert message.parts[0].text == ('<tool_response>\n{"temperature": 18}\n</tool_response>\n'
                                     "<tool_response>\nshipped\n</tool_response>")
