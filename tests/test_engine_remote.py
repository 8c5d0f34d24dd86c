"""The remote engine: the request body and the stream reader without sockets, then the engine against a
scripted OpenAI-compatible server on loopback (tests/remote_fixtures.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import pytest

from assistant.engine.remote import (ChunkReader, RemoteEngine, UpstreamError, chat_body, data_url,
                                     error_of_status)
from assistant.engine.request import (ChatMessage, Finished, GenerationRequest, ImageChunk, InlineImages,
                                      ScoreRequest, TextChunk, TokenDelta, ToolCallDelta)
from assistant.engine.sampling import SamplingParams
from assistant.engine.scheduler import EngineOverloaded
from assistant.tool_calls import (ArgumentsDelta, CallDone, CallStarted, TextDelta, ToolCallParser,
                                  render_tool_calls, tool_results_message)
from tests.remote_fixtures import Answer, FakeUpstream, chunk, free_port, running_upstream, text_answer

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


# ---------------------------------------------------------------- the engine over loopback


async def drain(engine: RemoteEngine, req: GenerationRequest) -> list[object]:
    return [event async for event in engine.generate(req)]


async def test_engine_streams_text_and_sends_the_images() -> None:
    upstream = FakeUpstream([text_answer("Hel", "lo", usage={"prompt_tokens": 9, "completion_tokens": 2})])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model", api_key="sk-up")
        req = request(ChatMessage("user", (TextChunk("What is it?"), ImageChunk("abc", "high"))),
                      image_source=InlineImages({"abc": PNG}))
        events = await drain(engine, req)
    assert events[:-1] == [TokenDelta("Hel", 1), TokenDelta("lo", 1)]
    assert events[-1] == Finished("stop", num_prompt_tokens=9, num_output_tokens=2, num_image_tokens=765)
    part = upstream.bodies[0]["messages"][0]["content"][1]
    assert part == {"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "high"}}
    assert upstream.headers[0]["authorization"] == "Bearer sk-up"
    assert engine.num_running == 0


async def test_abort_ends_the_upstream_request() -> None:
    upstream = FakeUpstream([text_answer(*["word "] * 1000, delay=0.02)])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model")
        events = []
        async for event in engine.generate(request()):
            events.append(event)
            if len(events) == 3:
                engine.abort("resp_1")
        assert events[-1].reason == "cancelled" and events[-1].num_output_tokens == len(events) - 1
        for _ in range(100):  # the upstream notices the closed connection
            if upstream.num_disconnects:
                break
            await asyncio.sleep(0.05)
        assert upstream.num_disconnects == 1


async def test_a_consumer_that_leaves_ends_the_upstream_request() -> None:
    upstream = FakeUpstream([text_answer(*["word "] * 1000, delay=0.02)])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model")
        async with contextlib.aclosing(engine.generate(request())) as events:
            async for _ in events:
                break
        for _ in range(100):
            if upstream.num_disconnects:
                break
            await asyncio.sleep(0.05)
        assert upstream.num_disconnects == 1 and engine.num_running == 0


async def test_a_slow_upstream_times_out_without_blocking_others() -> None:
    upstream = FakeUpstream([Answer([chunk({"content": "late"})], delay=30), text_answer("quick")])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model", timeout=1.0)
        slow = asyncio.ensure_future(drain(engine, request()))
        while not upstream.bodies:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        quick = await drain(engine, GenerationRequest("resp_2", request().messages))
        assert quick[0] == TokenDelta("quick", 1) and time.monotonic() - started < 1.0
        finished = (await slow)[-1]
    assert finished.reason == "error" and finished.code == "upstream_unavailable"
    assert "did not answer within 1 s" in (finished.error or "")


async def test_a_dead_upstream_is_a_coded_error() -> None:
    engine = RemoteEngine(f"http://127.0.0.1:{free_port()}/v1", "m")
    finished = (await drain(engine, request()))[-1]
    assert (finished.reason, finished.code) == ("error", "upstream_unavailable")


async def test_refusals_and_cut_streams_are_coded() -> None:
    upstream = FakeUpstream([Answer(status=429), Answer(status=400, error={"error": {"message": "bad image"}}),
                             Answer([chunk({"content": "half"})], done=False)])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model")
        outcomes = [(await drain(engine, request()))[-1] for _ in range(3)]
    assert [f.code for f in outcomes] == ["server_overloaded", "invalid_prompt", "upstream_unavailable"]
    assert "bad image" in (outcomes[1].error or "")
    assert outcomes[2].num_output_tokens == 1


async def test_missing_image_and_score_and_overload() -> None:
    engine = RemoteEngine("http://127.0.0.1:9/v1", "m", max_num_requests=1)
    req = request(ChatMessage("user", (ImageChunk("gone"),)))
    assert (await drain(engine, req))[-1].code == "image_not_found"
    scored = await engine.score(ScoreRequest("m1", ImageChunk("x"), ("a",)))
    assert (scored.reason, scored.code) == ("error", "not_supported_by_engine")
    upstream = FakeUpstream([text_answer("x", delay=0.5)])
    async with running_upstream(upstream):
        engine = RemoteEngine(upstream.url, "fake-model", max_num_requests=1)
        first = asyncio.ensure_future(drain(engine, request()))
        while not upstream.bodies:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded):
            await drain(engine, GenerationRequest("resp_2", request().messages))
        assert (await first)[-1].reason == "stop"
