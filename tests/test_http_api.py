"""The OpenAI-compatible HTTP API over real loopback sockets: the `openai` SDK's chat.completions with a
base_url, raw HTTP for what the SDK would not send, and the Realtime socket on the same port."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI

from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv_until, send
from tests.test_server_images import data_url
from tests.vision_fixtures import GRID, load_tiny_llava_chat, make_image

TIMEOUT = 60
QUESTION = [{"role": "user", "content": "Say something."}]


def client_for(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-unused", base_url=server.http_base, max_retries=0, timeout=TIMEOUT)


async def post(server: RunningServer, body: bytes | dict[str, Any], path: str = "/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.post(server.http_base + path, content=content,
                               headers={"Content-Type": "application/json"})


async def test_models_lists_the_served_model(server: RunningServer) -> None:
    client = client_for(server)
    models = [model.id async for model in client.models.list()]
    assert models == [server.app.model_name]
    assert (await client.models.retrieve(server.app.model_name)).id == server.app.model_name
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("gpt-9")
    assert info.value.code == "model_not_found"


async def test_completion_whole_and_streamed_agree(server: RunningServer) -> None:
    client = client_for(server)
    whole = await client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 6

    stream = await client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=6,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_sampling_fields_and_unknown_fields(server: RunningServer) -> None:
    client = client_for(server)
    first, second = [await client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=5, temperature=1.0, top_p=0.9, seed=7, stop=["\n\n"],
        frequency_penalty=0.5, presence_penalty=0.2, user="u-1", metadata={"k": "v"}, n=1,
        extra_body={"service_tier": "auto", "prompt_cache_key": "x", "parallel_tool_calls": True,
                    "some_future_field": {"a": 1}}) for _ in range(2)]
    assert first.choices[0].message.content == second.choices[0].message.content  # same seed


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_type", None),
    ({"model": "m"}, 400, "missing_required_parameter", "messages"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": "hi"}, 400, "invalid_type", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ({"messages": QUESTION, "n": 2}, 400, "invalid_value", "n"),
    ({"messages": QUESTION, "temperature": 3}, 400, "invalid_value", "temperature"),
    ({"messages": QUESTION, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"messages": QUESTION, "stop": [1]}, 400, "invalid_type", "stop"),
    ({"messages": QUESTION, "metadata": {"k": 1}}, 400, "invalid_value", "metadata.k"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "image_input_not_supported", "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     400, "invalid_value", "messages[0].content[0].type"),
])
async def test_bad_requests_get_openai_errors_and_store_nothing(
        server: RunningServer, body: bytes | dict[str, Any], status: int, code: str, param: str | None) -> None:
    if isinstance(body, dict):
        body = {**body, "store": True}
    response = await post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]
    with server.app.store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar() == 0


async def test_oversized_body_is_413(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, max_message_bytes=1000) as small:
        response = await post(small, {"messages": [{"role": "user", "content": "x" * 2000}]})
        assert response.status_code == 413 and response.json()["error"]["code"] == "message_too_large"


async def test_not_found_and_wrong_method_are_json_under_v1(server: RunningServer) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        missing = await http.get(server.http_base + "/responses")
        wrong = await http.get(server.http_base + "/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_context_overflow_is_400_before_streaming(server: RunningServer) -> None:
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="tiny", stream=True,
                                             messages=[{"role": "user", "content": "word " * 5000}])
    assert info.value.code == "context_length_exceeded"


def engine_is_idle(server: RunningServer) -> bool:
    scheduler = server.app.engine.engine.scheduler
    return scheduler.num_running == 0 and scheduler.num_waiting == 0


async def wait_idle(server: RunningServer) -> float:
    started = time.monotonic()
    while not engine_is_idle(server):
        assert time.monotonic() - started < TIMEOUT
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_cancels_generation(server: RunningServer, stream: bool) -> None:
    body = json.dumps({"messages": QUESTION, "max_tokens": 100_000, "stream": stream, "store": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    started = time.monotonic()
    while engine_is_idle(server):
        assert time.monotonic() - started < TIMEOUT
        await asyncio.sleep(0.01)
    if stream:
        head = b""
        while b"data: " not in head:  # the headers may come in a read of their own
            chunk = await asyncio.wait_for(reader.read(4096), TIMEOUT)
            assert chunk, head
            head += chunk
    writer.close()
    await wait_idle(server)
    await asyncio.sleep(0.5)  # the run stores its outcome after it leaves the engine
    with server.app.store.engine.connect() as connection:
        status, reason = connection.exec_driver_sql("SELECT status, reason FROM responses").one()
    assert (status, reason) == ("cancelled", "client_cancelled")  # not "incomplete": the context did not fill


async def test_store_keeps_the_exchange_as_a_resumable_conversation(server: RunningServer) -> None:
    client = client_for(server)
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, *QUESTION], max_tokens=4,
        temperature=0, store=True, metadata={"ticket": "T-9"})
    conversation_id = raw.headers["x-conversation-id"]
    completion = raw.parse()
    assert completion.metadata == {"ticket": "T-9"}
    assert server.app.store.conversation_metadata(conversation_id) == {"ticket": "T-9"}
    ws, session = await open_session(server, f"?conversation={conversation_id}")
    assert session["conversation_id"] == conversation_id
    items = server.app.store.list_items(conversation_id)
    assert [(item.role, item.text) for item in items] == [
        ("system", "Be brief."), ("user", "Say something."), ("assistant", completion.choices[0].message.content)]
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 2}})
    done = (await recv_until(ws, "response.done"))[-1]
    assert done["response"]["status"] in ("completed", "incomplete")
    await ws.close()


async def test_without_store_nothing_is_kept(server: RunningServer) -> None:
    raw = await client_for(server).chat.completions.with_raw_response.create(model="tiny", messages=QUESTION,
                                                                              max_tokens=2)
    assert "x-conversation-id" not in raw.headers
    with server.app.store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar() == 0


async def test_http_and_realtime_share_the_port_and_engine(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}})
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 20}})
    completion = await client_for(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=20)
    assert completion.usage is not None and completion.usage.completion_tokens == 20
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "incomplete"
    await ws.close()


# ---------------------------------------------------------------- images


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
async def vision_server(vision_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(vision_model, data_dir, max_images_per_message=2) as running:
        yield running


def image_message(*urls: str, detail: str = "auto") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                        *({"type": "image_url", "image_url": {"url": url, "detail": detail}}
                                          for url in urls)]}


async def test_image_parts_are_seen_and_counted(vision_server: RunningServer) -> None:
    client = client_for(vision_server)
    red = data_url(make_image(1))
    completion = await client.chat.completions.create(model="tiny", messages=[image_message(red)], max_tokens=3,
                                                      temperature=0, store=True)
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    details = completion.usage.model_dump()["prompt_tokens_details"]
    assert details["image_tokens"] == GRID * GRID
    again = await client.chat.completions.create(model="tiny", messages=[image_message(red)], max_tokens=3,
                                                 temperature=0)
    assert again.choices[0].message.content == completion.choices[0].message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens and again.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(("url", "code"), [
    ("https://example.com/cat.png", "image_remote_url_refused"),
    ("data:image/png;base64,!!!!", "image_invalid_base64"),
    ("data:image/png;base64,aGVsbG8=", "image_unsupported_format"),  # "hello" is no image
])
async def test_bad_images_are_refused_with_their_code(vision_server: RunningServer, url: str, code: str) -> None:
    response = await post(vision_server, {"messages": [image_message(url)], "store": True})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "messages[0].content[1].image_url.url"
    with vision_server.app.store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar() == 0


async def test_too_many_images_in_one_message(vision_server: RunningServer) -> None:
    red = data_url(make_image(1))
    response = await post(vision_server, {"messages": [image_message(red, red, red)]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"


async def test_streamed_image_answer_over_sse_is_well_formed(vision_server: RunningServer) -> None:
    body = {"messages": [image_message(data_url(make_image(2)))], "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        async with http.stream("POST", vision_server.http_base + "/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
HANDOFF = {"type": "function", "function": {
    "name": "handoff_to_human", "description": "Pass the conversation to a person.",
    "parameters": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 40}},
                   "required": ["reason"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_weather_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"} and isinstance(parsed["city"], str) and len(parsed["city"]) <= 20
    assert parsed["unit"] in ("celsius", "fahrenheit")


async def test_required_tool_call_is_valid_whole_and_streamed(server: RunningServer) -> None:
    """The tiny random model writes garbage unless constrained: every call here validates anyway."""
    client = client_for(server)
    whole = await client.chat.completions.create(model="tiny", messages=ASK_WEATHER, tools=[WEATHER, HANDOFF],
                                                 tool_choice="required", parallel_tool_calls=False,
                                                 temperature=1.0, seed=3, max_tokens=200,
                                                 stop=['"', ","])  # the grammar decides the end, not stops
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert calls[0].function.name in ("get_weather", "handoff_to_human")
    json.loads(calls[0].function.arguments)

    stream = await client.chat.completions.create(
        model="tiny", messages=ASK_WEATHER, tools=[WEATHER], stream=True, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=5)
    chunks = [chunk async for chunk in stream]
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    check_weather_arguments(arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_tool_round_trip_is_stored_and_continues(server: RunningServer) -> None:
    client = client_for(server)
    first = await client.chat.completions.create(model="tiny", messages=ASK_WEATHER, tools=[WEATHER],
                                                 tool_choice="required", temperature=0, max_tokens=200)
    call = (first.choices[0].message.tool_calls or [])[0]
    check_weather_arguments(call.function.arguments)
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}]
    raw = await client.chat.completions.with_raw_response.create(model="tiny", messages=messages, tools=[WEATHER],
                                                                 tool_choice="none", max_tokens=5, store=True)
    second = raw.parse()
    assert second.choices[0].message.content is not None and not second.choices[0].message.tool_calls
    items = server.app.store.list_items(raw.headers["x-conversation-id"])
    assert [item.type for item in items] == ["message", "function_call", "function_call_output", "message"]
    assert items[1].call_id == items[2].call_id == call.id and items[2].output == '{"temp_c": 21, "sky": "clear"}'


async def test_json_schema_response_format_validates(server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer"], "additionalProperties": False}
    completion = await client_for(server).chat.completions.create(
        model="tiny", messages=QUESTION, temperature=1.0, seed=1, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": schema, "strict": True}})
    parsed = json.loads(completion.choices[0].message.content or "")
    assert set(parsed) == {"answer"} and 0 <= parsed["answer"] <= 9


@pytest.mark.parametrize(("extra", "code", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "invalid_value", "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_value", "tools[0].function.name"),
    ({"tools": "all"}, "invalid_type", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}]},
     "unsupported_schema", "tools[0].function.parameters"),
    ({"messages": [*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "invalid_value", "messages[1].tool_call_id"),
])
async def test_bad_tool_requests_get_coded_errors_and_store_nothing(
        server: RunningServer, extra: dict[str, Any], code: str, param: str) -> None:
    response = await post(server, {"messages": ASK_WEATHER, "store": True, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    with server.app.store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar() == 0


# A Hermes-style template (as Qwen 2.5's) that lists the tools itself.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n"
    "{% endif %}# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a function inside <tool_call></tool_call> tags.<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message.role != 'system' %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


async def test_a_template_that_lists_tools_gets_them_instead_of_the_generic_prompt(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from assistant.engine.loader import load_chat_model
    from tests.engine_fixtures import save_tiny_chat_model

    model = load_chat_model(str(save_tiny_chat_model(tmp_path / "tiny", max_position_embeddings=2048)),
                            dtype="float32")
    model.tokenizer.chat_template = TOOLS_TEMPLATE
    assert model.renders_tools
    async with running_server(model, data_dir, temperature=0) as served:
        assert served.app.renders_tools
        seen = []
        generate = served.app.engine.generate

        def recording(request: Any) -> Any:
            seen.append(request)
            return generate(request)

        monkeypatch.setattr(served.app.engine, "generate", recording)
        completion = await client_for(served).chat.completions.create(
            model="tiny", messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=200)
        check_weather_arguments((completion.choices[0].message.tool_calls or [])[0].function.arguments)
        ws, _ = await open_session(served)  # the Realtime session does the same
        await send(ws, {"type": "session.update", "session": {
            "type": "realtime", "tool_choice": "required",
            "tools": [{"type": "function", **WEATHER["function"]}]}})  # type: ignore[dict-item]
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris?"}]}})
        await send(ws, {"type": "response.create", "response": {"max_output_tokens": 200}})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        check_weather_arguments(done["output"][0]["arguments"])
        await ws.close()
    assert len(seen) == 2
    for request in seen:
        assert [tool["function"]["name"] for tool in request.tools] == ["get_weather"]
        system = [m for m in request.messages if m.role == "system"]
        assert all("<tools>" not in part.text for m in system for part in m.parts)  # not the generic prompt
    request = seen[0]
    rendered = model.render(request.messages, 4096, tools=request.tools)
    text = model.tokenizer.decode([t for segment in rendered.segments for t in segment])
    assert '"name": "get_weather"' in text and "# Tools" in text


async def test_a_stream_whose_client_reads_nothing_ends_after_the_send_timeout() -> None:
    """Over loopback the kernel's socket buffers hold a whole answer, so the bound is checked on the response
    itself: a send that cannot complete (a client that reads nothing, buffers full) ends the stream, and closing
    the stream is what aborts the generation behind it (``_stream``'s finally)."""
    from assistant.http_api import _BoundedStream

    closed = asyncio.Event()

    async def chunks() -> AsyncIterator[str]:
        try:
            for n in range(1000):
                yield f"data: {n}\n\n"
        finally:
            closed.set()

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) > 3:
            await asyncio.Event().wait()  # the transport never drains

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never disconnects either
        return {}

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
    started = time.monotonic()
    await asyncio.wait_for(_BoundedStream(chunks(), 0.2, media_type="text/event-stream")(scope, receive, send), 10)
    assert time.monotonic() - started < 5 and closed.is_set() and len(sent) == 4
