"""Client-event parsing: every accepted shape and every coded rejection, without sockets."""

from __future__ import annotations

import json

import pytest

from assistant.errors import AssistantError
from assistant.protocol import (AudioBufferClear, ImageInput, ImageMatch, ItemCreate, ItemDelete, ItemInput,
                                ItemRetrieve, ResponseCancel, ResponseCreate, SessionUpdate, TextInput,
                                parse_client_event)


def parse(event: dict) -> object:
    return parse_client_event(json.dumps(event))


def rejection(frame: str | bytes | dict) -> AssistantError:
    raw = json.dumps(frame) if isinstance(frame, dict) else frame
    with pytest.raises(AssistantError) as info:
        parse_client_event(raw)
    return info.value


def test_session_update_ga_with_extensions() -> None:
    event = parse({"type": "session.update", "event_id": "e1", "session": {
        "type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"], "max_output_tokens": 42,
        "temperature": 0, "top_p": 0.9, "seed": 7, "stop": "END", "audio": {"output": {"voice": "alloy"}}}})
    assert isinstance(event, SessionUpdate) and event.event_id == "e1"
    assert event.changes.instructions == "Be brief."
    assert event.changes.sampling == {"max_output_tokens": 42, "temperature": 0.0, "top_p": 0.9, "seed": 7,
                                      "stop": ("END",)}
    [refused] = event.refused  # the voice is not applied, the rest is
    assert (refused.code, refused.param) == ("audio_not_supported", "session.audio.output.voice")


def test_session_update_beta_names() -> None:
    event = parse({"type": "session.update", "session": {"modalities": ["text"], "max_response_output_tokens": "inf"}})
    assert isinstance(event, SessionUpdate) and event.changes.sampling == {"max_output_tokens": None}
    assert event.refused == ()


def test_penalties_are_sampling_changes() -> None:
    event = parse({"type": "response.create", "response": {
        "frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.1}})
    assert isinstance(event, ResponseCreate)
    assert event.changes.sampling == {"frequency_penalty": 0.5, "presence_penalty": -1.0, "repetition_penalty": 1.1}


def test_what_an_agent_sdk_sends_is_applied_and_audio_is_named() -> None:
    """The OpenAI Agents SDK in text mode: audio formats, a voice, transcription, no turn detection, no tools."""
    event = parse({"type": "session.update", "event_id": "e2", "session": {
        "type": "realtime", "model": "gpt-realtime", "instructions": "Be kind.", "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "x"},
                            "turn_detection": None},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "ash"}},
        "tools": [], "tool_choice": "auto", "tracing": None, "truncation": "auto"}})
    assert isinstance(event, SessionUpdate) and event.changes.instructions == "Be kind."
    [refused] = event.refused
    assert refused.code == "audio_not_supported" and refused.param == "session.audio.input.format"
    for path in ("session.audio.input.transcription", "session.audio.output.format", "session.audio.output.voice"):
        assert path in refused.message
    assert "turn_detection" not in refused.message  # null: nothing to refuse


@pytest.mark.parametrize("session, codes, params", [
    ({"output_modalities": ["audio"], "instructions": "x"}, ["audio_not_supported"], ["session.output_modalities"]),
    ({"modalities": ["text", "audio"], "voice": "alloy", "turn_detection": {"type": "server_vad"}},
     ["audio_not_supported"], ["session.modalities"]),
    ({"input_audio_format": "pcm16"}, ["audio_not_supported"], ["session.input_audio_format"]),
    ({"voice": "ash", "tools": [{"type": "function", "name": "f"}]}, ["audio_not_supported"], ["session.voice"]),
    ({"tools": [], "tool_choice": "none", "tracing": "auto", "include": None}, [], []),
])
def test_unsupported_fields_are_refused_by_name_and_the_rest_applies(session: dict, codes: list,
                                                                      params: list) -> None:
    event = parse({"type": "session.update", "session": {**session, "temperature": 0.5}})
    assert isinstance(event, SessionUpdate) and event.changes.sampling == {"temperature": 0.5}
    assert [e.code for e in event.refused] == codes and [e.param for e in event.refused] == params
    response = parse({"type": "response.create", "response": {**session, "temperature": 0.5}})
    assert isinstance(response, ResponseCreate) and response.changes.sampling == {"temperature": 0.5}
    assert [e.code for e in response.refused] == codes


def test_tools_are_validated_and_the_tool_choice_kept_as_sent() -> None:
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    for kind, key in (("session.update", "session"), ("response.create", "response")):
        event = parse({"type": kind, key: {"tools": [weather], "tool_choice": {"type": "function", "name": "nope"}}})
        assert isinstance(event, SessionUpdate | ResponseCreate) and event.refused == ()
        [tool] = event.changes.tools or ()
        assert (tool.name, tool.description, tool.parameters) == ("get_weather", weather["description"],
                                                                   weather["parameters"])
        assert event.changes.tool_choice == {"type": "function", "name": "nope"}  # the session checks the name
    untouched = parse({"type": "session.update", "session": {"instructions": "x"}})
    assert isinstance(untouched, SessionUpdate)
    assert (untouched.changes.tools, untouched.changes.tool_choice) == (None, None)


def test_item_create_function_call_and_its_output() -> None:
    call = parse({"type": "conversation.item.create", "item": {
        "id": "item_c", "type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}'}})
    assert isinstance(call, ItemCreate)
    assert call.item == ItemInput("item_c", "assistant", (), "function_call", call_id="call_1", name="get_weather",
                                  arguments='{"city": "Paris"}')
    output = parse({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_1", "output": ""}})
    assert isinstance(output, ItemCreate)
    assert output.item == ItemInput(None, "user", (), "function_call_output", call_id="call_1", output="")


def test_audio_buffer_clear_is_answered() -> None:
    assert parse({"type": "input_audio_buffer.clear", "event_id": "c"}) == AudioBufferClear("c")


def test_item_create_user_text_and_image() -> None:
    event = parse({"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "id": "item_1", "type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]}})
    assert isinstance(event, ItemCreate) and event.previous_item_id == "root"
    assert event.item.id == "item_1" and event.item.role == "user"
    assert event.item.content == (TextInput("input_text", "hi"), ImageInput("data:image/png;base64,AAAA", "low"))


def test_item_create_assistant_accepts_ga_and_beta_part_types() -> None:
    for kind in ("output_text", "text"):
        event = parse({"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant", "content": [{"type": kind, "text": "ok"}]}})
        assert isinstance(event, ItemCreate) and event.item.content == (TextInput("output_text", "ok"),)
        assert event.previous_item_id is None and event.item.id is None


def test_response_create_and_cancel_and_items() -> None:
    event = parse({"type": "response.create", "response": {
        "instructions": "x", "max_output_tokens": 5, "conversation": "none", "metadata": {"k": "v"},
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}]}})
    assert isinstance(event, ResponseCreate)
    assert not event.use_conversation and event.metadata == {"k": "v"} and len(event.input or ()) == 1
    assert isinstance(parse({"type": "response.create"}), ResponseCreate)
    assert parse({"type": "response.cancel"}) == ResponseCancel(None, None)
    assert parse({"type": "conversation.item.delete", "item_id": "a"}) == ItemDelete(None, "a")
    assert parse({"type": "conversation.item.retrieve", "item_id": "a", "event_id": "e"}) == ItemRetrieve("e", "a")


@pytest.mark.parametrize("frame, code, param", [
    ("not json", "invalid_json", None),
    (b"\xff\xfe", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    ({"event_id": "e"}, "missing_required_parameter", "type"),
    ({"type": "nope", "event_id": "e"}, "unknown_event_type", "type"),
    ({"type": "input_audio_buffer.append", "audio": ""}, "audio_not_supported", "type"),
    ({"type": "input_audio_buffer.commit"}, "audio_not_supported", "type"),
    ({"type": "conversation.item.truncate", "item_id": "a", "content_index": 0, "audio_end_ms": 5},
     "audio_not_supported", "type"),
    ({"type": "session.update", "session": {"output_modalities": ["video"]}}, "invalid_value",
     "session.output_modalities"),
    ({"type": "session.update", "session": {"output_modalities": []}}, "invalid_value", "session.output_modalities"),
    ({"type": "session.update", "session": {"audio": "loud"}}, "invalid_type", "session.audio"),
    ({"type": "session.update", "session": {"tools": {}}}, "invalid_type", "session.tools"),
    ({"type": "session.update", "session": {"frequency_penalty": 2.5}}, "invalid_value",
     "session.frequency_penalty"),
    ({"type": "session.update", "session": {"repetition_penalty": 0}}, "invalid_value",
     "session.repetition_penalty"),
    ({"type": "response.create", "response": {"presence_penalty": "x"}}, "invalid_type",
     "response.presence_penalty"),
    ({"type": "session.update"}, "missing_required_parameter", "session"),
    ({"type": "session.update", "session": []}, "invalid_type", "session"),
    ({"type": "session.update", "session": {"temperature": "hot"}}, "invalid_type", "session.temperature"),
    ({"type": "session.update", "session": {"temperature": 3}}, "invalid_value", "session.temperature"),
    ({"type": "session.update", "session": {"top_p": 0}}, "invalid_value", "session.top_p"),
    ({"type": "session.update", "session": {"max_output_tokens": 0}}, "invalid_value", "session.max_output_tokens"),
    ({"type": "session.update", "session": {"max_output_tokens": True}}, "invalid_value", "session.max_output_tokens"),
    ({"type": "session.update", "session": {"stop": [1]}}, "invalid_type", "session.stop"),
    ({"type": "session.update", "session": {"stop": ["a", "b", "c", "d", "e"]}}, "invalid_value", "session.stop"),
    ({"type": "session.update", "session": {"seed": -1}}, "invalid_value", "session.seed"),
    ({"type": "conversation.item.create"}, "missing_required_parameter", "item"),
    ({"type": "conversation.item.create", "item": {"role": "user"}}, "missing_required_parameter", "item.content"),
    ({"type": "conversation.item.create", "item": {"role": "robot", "content": []}}, "invalid_value", "item.role"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": []}}, "invalid_value", "item.content"),
    ({"type": "conversation.item.create", "item": {"type": "mcp_call", "role": "user", "content": []}},
     "invalid_value", "item.type"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}},
     "missing_required_parameter", "item.call_id"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c", "output": 3}},
     "invalid_type", "item.output"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c"}},
     "missing_required_parameter", "item.output"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c",
                                                   "output": "x" * 200_001}}, "invalid_value", "item.output"),
    ({"type": "conversation.item.create", "item": {"type": "function_call", "call_id": "c", "arguments": "{}"}},
     "missing_required_parameter", "item.name"),
    ({"type": "conversation.item.create", "item": {"type": "function_call", "call_id": "c", "name": "no spaces",
                                                   "arguments": "{}"}}, "invalid_value", "item.name"),
    ({"type": "response.create", "response": {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}},
     "missing_required_parameter", "response.input[0].call_id"),
    ({"type": "session.update", "session": {"tools": [{"type": "function"}]}}, "missing_required_parameter",
     "session.tools[0].name"),
    ({"type": "response.create", "response": {"tools": {"type": "function", "name": "f"}}}, "invalid_type",
     "response.tools"),
    ({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}]}},
     "unsupported_schema", "session.tools[0].parameters"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text"}]}},
     "missing_required_parameter", "item.content[0].text"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", "text": 5}]}},
     "invalid_type", "item.content[0].text"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": ["hi"]}}, "invalid_type",
     "item.content[0]"),
    ({"type": "conversation.item.create", "item": {"role": "system", "content": [
        {"type": "input_image", "image_url": "data:"}]}}, "invalid_value", "item.content[0].type"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": [
        {"type": "input_image", "image_url": "data:", "detail": "ultra"}]}}, "invalid_value", "item.content[0].detail"),
    ({"type": "conversation.item.create", "item": {"id": "x" * 65, "role": "user", "content": [
        {"type": "input_text", "text": "a"}]}}, "invalid_value", "item.id"),
    ({"type": "conversation.item.create", "previous_item_id": 3, "item": {"role": "user", "content": [
        {"type": "input_text", "text": "a"}]}}, "invalid_type", "previous_item_id"),
    ({"type": "conversation.item.delete"}, "missing_required_parameter", "item_id"),
    ({"type": "conversation.item.retrieve", "item_id": ""}, "invalid_value", "item_id"),
    ({"type": "response.create", "response": {"conversation": "other"}}, "invalid_value", "response.conversation"),
    ({"type": "response.create", "response": {"metadata": {"a": 1}}}, "invalid_type", "response.metadata"),
    ({"type": "response.create", "response": {"input": [{"role": "user"}]}}, "missing_required_parameter",
     "response.input[0].content"),
    ({"type": "response.cancel", "response_id": 1}, "invalid_type", "response_id"),
])
def test_rejections_are_coded_with_param(frame: str | bytes | dict, code: str, param: str | None) -> None:
    error = rejection(frame)
    assert error.code == code
    assert error.param == param
    assert error.message


def test_rejection_echoes_client_event_id() -> None:
    error = rejection({"type": "session.update", "event_id": "evt_9", "session": {"temperature": "x"}})
    assert error.event_id == "evt_9"
    assert error.to_wire()["event_id"] == "evt_9"


@pytest.mark.parametrize("frame, code, param", [
    ('{"type": "session.update", "session": {"instructions": "\\ud800"}}', "invalid_value", "session.instructions"),
    ('{"type": "session.update", "session": {"stop": ["a", "\\udfff"]}}', "invalid_value", "session.stop[1]"),
    ('{"type": "response.create", "response": {"metadata": {"k": "\\ud83d"}}}', "invalid_value",
     "response.metadata.k"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", '
     '"text": "x\\ud800"}]}}', "invalid_value", "item.content[0].text"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", '
     '"text": "a\\u0000b"}]}}', "invalid_value", "item.content[0].text"),  # PostgreSQL cannot store NUL
    ("[" * 100_000, "invalid_json", None),
    ('{"type": "conversation.item.create", "item": {"id": "root", "role": "user", "content": '
     '[{"type": "input_text", "text": "a"}]}}', "invalid_value", "item.id"),
    (json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": [
        {"type": "input_text", "text": "x" * 200_001}]}}), "invalid_value", "item.content[0].text"),
    (json.dumps({"type": "response.create", "response": {"metadata": {f"k{i}": "v" for i in range(17)}}}),
     "invalid_value", "response.metadata"),
])
def test_hostile_strings_and_shapes(frame: str, code: str, param: str | None) -> None:
    error = rejection(frame)
    assert (error.code, error.param) == (code, param)


def test_an_event_id_that_cannot_be_echoed_is_refused_without_echo() -> None:
    error = rejection('{"type": "response.cancel", "event_id": "\\ud800"}')
    assert (error.code, error.param, error.event_id) == ("invalid_value", "event_id", None)
    json.dumps(error.to_wire()).encode("utf-8")  # the error itself can be sent


@pytest.mark.parametrize("number", ["1" * 400, "-" + "9" * 5000, "1e400", "-1e999", "NaN", "Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty", "repetition_penalty"])
def test_over_long_numbers_in_float_fields_are_invalid_values(number: str, field: str) -> None:
    error = rejection('{"type": "session.update", "event_id": "n", "session": {"%s": %s}}' % (field, number))
    assert (error.code, error.param, error.event_id) == ("invalid_value", f"session.{field}", "n")


def test_over_long_integers_elsewhere_are_coded_too() -> None:
    assert rejection('{"type": "session.update", "session": {"seed": %s}}' % ("7" * 5000)).param == "session.seed"
    error = rejection('{"type": "session.update", "session": {"max_output_tokens": %s}}' % ("7" * 90))
    assert (error.code, error.param) == ("invalid_value", "session.max_output_tokens")


# ---------------------------------------------------------------- image.match (extension)

IMAGE = {"image_url": "data:image/png;base64,iVBORw0KGgo="}


def test_image_match_is_parsed_with_its_defaults() -> None:
    event = parse({"type": "image.match", "event_id": "m1", "image": IMAGE, "texts": ["a cat", "a dog"]})
    assert event == ImageMatch("m1", ImageInput(IMAGE["image_url"], "auto"), ("a cat", "a dog"), None)
    event = parse({"type": "image.match", "image": {**IMAGE, "detail": "low"}, "texts": ["x" * 1000] * 16,
                   "prompt": "What is shown?"})
    assert isinstance(event, ImageMatch) and event.image.detail == "low" and event.prompt == "What is shown?"
    assert len(event.texts) == 16 and event.scoring == "likelihood"
    event = parse({"type": "image.match", "image": IMAGE, "texts": ["a"], "scoring": "gain"})
    assert isinstance(event, ImageMatch) and event.scoring == "gain"


@pytest.mark.parametrize("fields, code, param", [
    ({"texts": ["a"]}, "missing_required_parameter", "image"),
    ({"image": "data:image/png;base64,AAAA", "texts": ["a"]}, "invalid_type", "image"),
    ({"image": {}, "texts": ["a"]}, "missing_required_parameter", "image.image_url"),
    ({"image": {**IMAGE, "detail": "ultra"}, "texts": ["a"]}, "invalid_value", "image.detail"),
    ({"image": IMAGE}, "missing_required_parameter", "texts"),
    ({"image": IMAGE, "texts": "a cat"}, "invalid_type", "texts"),
    ({"image": IMAGE, "texts": []}, "invalid_value", "texts"),
    ({"image": IMAGE, "texts": ["a"] * 17}, "invalid_value", "texts"),
    ({"image": IMAGE, "texts": ["a", 2]}, "invalid_type", "texts[1]"),
    ({"image": IMAGE, "texts": ["a", ""]}, "invalid_value", "texts[1]"),
    ({"image": IMAGE, "texts": ["x" * 1001]}, "invalid_value", "texts[0]"),
    ({"image": IMAGE, "texts": ["a"], "prompt": ""}, "invalid_value", "prompt"),
    ({"image": IMAGE, "texts": ["a"], "prompt": 7}, "invalid_type", "prompt"),
    ({"image": IMAGE, "texts": ["a"], "scoring": "pmi"}, "invalid_value", "scoring"),
    ({"image": IMAGE, "texts": ["a"], "scoring": ""}, "invalid_value", "scoring"),
    ({"image": IMAGE, "texts": ["a"], "scoring": 1}, "invalid_type", "scoring"),
])
def test_image_match_rejections_are_coded_with_param(fields: dict, code: str, param: str) -> None:
    error = rejection({"type": "image.match", "event_id": "m2", **fields})
    assert (error.code, error.param, error.event_id) == (code, param, "m2")
