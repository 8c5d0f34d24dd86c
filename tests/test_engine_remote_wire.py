"""The remote engine's wire format without sockets: the request body, the stream reader, upstream errors, and
the tool-call parser's typed path."""

from __future__ import annotations

import base64
import json

import pytest

from assistant.engine.remote_wire import ChunkReader, UpstreamError, chat_body, data_url, error_of_status
from assistant.engine.request import ChatMessage, Finished, GenerationRequest, ImageChunk, TextChunk, TokenDelta, \
    ToolCallDelta
from assistant.engine.sampling import SamplingParams
from assistant.tool_calls import (ArgumentsDelta, CallDone, CallStarted, TextDelta, ToolCallParser,
                                  parse_tool_results, render_tool_calls, tool_results_message)
from tests.remote_fixtures import chunk

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def request(*messages: ChatMessage, **fields: object) -> GenerationRequest:
    return GenerationRequest("resp_1", messages or (ChatMessage("user", (TextChunk("Hi"),)),), **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the body


def test_body_carries_messages_images_sampling_and_tools() -> None:
    messages = (ChatMessage("system", (TextChunk("Be brief."),)),
                ChatMessage("user", (TextChunk("What is this?"), ImageChunk("abc", "low"))),
                ChatMessage("assistant", (TextChunk("A square."),)))
    params = SamplingParams(temperature=0.5, top_p=0.9, seed=7, stop=("END",), max_output_tokens=20,
                            frequency_penalty=0.1, presence_penalty=0.2, repetition_penalty=1.1)
    body = chat_body(request(*messages, params=params, tools=(WEATHER,), tool_choice="required"), "m",
                     {"abc": "data:image/png;base64,AAAA"})
    assert body["model"] == "m" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                        "detail": "low"}}]},
        {"role": "assistant", "content": "A square."}]
    assert {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "max_tokens", "frequency_penalty",
                                 "presence_penalty", "repetition_penalty")} == {
        "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["END"], "max_tokens": 20, "frequency_penalty": 0.1,
        "presence_penalty": 0.2, "repetition_penalty": 1.1}
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "required"


def test_body_leaves_out_what_is_not_set() -> None:
    body = chat_body(request(params=SamplingParams()), "m", {})
    assert not {"max_tokens", "stop", "seed", "repetition_penalty", "tools", "tool_choice"} & set(body)


def test_earlier_calls_and_results_go_as_tool_calls_and_tool_messages() -> None:
    calls = render_tool_calls([("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')])
    messages = (ChatMessage("user", (TextChunk("Weather?"),)), ChatMessage("assistant", (TextChunk(calls),)),
                tool_results_message(["sunny", "rain\nlater"]), ChatMessage("assistant", (TextChunk("Mixed."),)))
    sent = chat_body(request(*messages), "m", {})["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    assert sent[2:4] == [{"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"},
                         {"role": "tool", "tool_call_id": "call_1_1", "content": "rain\nlater"}]
    assert sent[4] == {"role": "assistant", "content": "Mixed."}
    # A user who writes a <tool_response> block with no call before it is just text.
    alone = chat_body(request(tool_results_message(["x"])), "m", {})["messages"]
    assert alone == [{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}]
    results = tool_results_message(["a", "{\"b\": [1,\n2]}"]).parts[0]
    assert isinstance(results, TextChunk) and parse_tool_results(results.text) == ["a", "{\"b\": [1,\n2]}"]
    assert parse_tool_results("<tool_response>\na\n</tool_response> and more") is None


def test_data_url_names_the_stored_format() -> None:
    assert data_url(PNG).startswith("data:image/png;base64,")
    assert data_url(b"\xff\xd8\xff\xe0rest").startswith("data:image/jpeg;base64,")
    assert data_url(b"RIFF\0\0\0\0WEBPVP8 ").startswith("data:image/webp;base64,")
    assert base64.b64decode(data_url(PNG).split(",", 1)[1]) == PNG


# ---------------------------------------------------------------- the stream


def lines(*chunks: dict[str, object] | str) -> list[str]:
    return [f"data: {c if isinstance(c, str) else json.dumps(c)}" for c in chunks]


def read(reader: ChunkReader, *chunks: dict[str, object] | str) -> list[object]:
    events: list[object] = []
    for line in ["", ": keep-alive", *lines(*chunks)]:
        events += reader.feed(line)
    return events


def test_reader_relays_text_and_the_upstream_usage() -> None:
    reader = ChunkReader(num_prompt_chars=400)
    events = read(reader, chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                  chunk({"content": "lo"}), chunk({}, "length"),
                  {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2,
                                            "prompt_tokens_details": {"cached_tokens": 8}}}, "[DONE]")
    assert events == [TokenDelta("Hel", 1), TokenDelta("lo", 1)] and reader.is_done
    assert reader.finish() == Finished("length", num_prompt_tokens=12, num_output_tokens=2, num_cached_tokens=8)


def test_reader_estimates_usage_the_upstream_does_not_report() -> None:
    reader = ChunkReader(num_prompt_chars=400, num_image_tokens=85)
    read(reader, chunk({"content": "a"}), chunk({"content": "b"}), chunk({}, "stop"), "[DONE]")
    assert reader.finish() == Finished("stop", num_prompt_tokens=185, num_output_tokens=2, num_image_tokens=85)


def test_reader_types_tool_call_deltas() -> None:
    reader = ChunkReader()
    events = read(reader, chunk({"tool_calls": [{"index": 0, "id": "x", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": ""}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
                  chunk({}, "tool_calls"), "[DONE]")
    assert events == [ToolCallDelta(0, "get_weather", ""), ToolCallDelta(0, None, '{"city": '),
                      ToolCallDelta(0, None, '"Paris"}')]
    assert reader.finish().reason == "stop"


def test_reader_turns_a_cut_or_failed_stream_into_coded_errors() -> None:
    cut = ChunkReader()
    read(cut, chunk({"content": "a"}))
    with pytest.raises(UpstreamError) as raised:
        cut.finish()
    assert raised.value.code == "upstream_unavailable"
    with pytest.raises(UpstreamError):
        read(ChunkReader(), {"error": {"message": "CUDA out of memory"}})
    with pytest.raises(UpstreamError):
        read(ChunkReader(), "{not json")


@pytest.mark.parametrize(("status", "body", "code"), [
    (400, b'{"error": {"message": "This model\'s maximum context length is 2048 tokens"}}', "context_length_exceeded"),
    (400, b'{"detail": "bad role"}', "invalid_prompt"),
    (429, b"slow down", "server_overloaded"),
    (503, b"", "server_overloaded"),
    (401, b'{"error": "bad key"}', "upstream_unavailable"),
    (500, b"Traceback ...", "upstream_unavailable"),
])
def test_upstream_statuses_become_codes(status: int, body: bytes, code: str) -> None:
    error = error_of_status(status, body)
    assert error.code == code
    assert "Traceback" not in error.message and "bad key" not in error.message


# ---------------------------------------------------------------- the parser's typed path


def test_typed_calls_become_the_same_events_as_parsed_ones() -> None:
    ids = iter(["call_a", "call_b"])
    parser = ToolCallParser(new_id=lambda: next(ids))
    events = parser.push("Let me check.") + parser.push_call(ToolCallDelta(0, "get_weather", '{"city": '))
    events += parser.push_call(ToolCallDelta(0, None, '"Paris"}')) + parser.push_call(ToolCallDelta(1, "now", "{}"))
    events += parser.push("\n") + parser.push("Done.") + parser.finish()
    assert [type(e) for e in events] == [TextDelta, CallStarted, ArgumentsDelta, ArgumentsDelta, CallDone,
                                         CallStarted, ArgumentsDelta, TextDelta, CallDone]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Let me check.", "Done."]
    done = [e.call for e in events if isinstance(e, CallDone)]
    assert [(c.call_id, c.name, c.arguments) for c in done] == [("call_a", "get_weather", '{"city": "Paris"}'),
                                                               ("call_b", "now", "{}")]
