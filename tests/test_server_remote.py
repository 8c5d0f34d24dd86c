"""The server with ``--engine openai`` in front of a scripted upstream (tests/remote_fixtures.py): the
Realtime protocol, the HTTP API, tools, images, cancel and upstream failures, as a client sees them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI
from PIL import Image

from tests.conftest import RunningServer, running_server
from tests.remote_fixtures import Answer, FakeUpstream, chunk, running_upstream, text_answer
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.test_server_images import data_url

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def call_answer(name: str, *pieces: str) -> Answer:
    chunks: list[dict[str, Any] | str] = [chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "upstream_id", "type": "function", "function": {"name": name, "arguments": ""}}]})]
    chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in pieces]
    chunks += [chunk({}, "tool_calls"), {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 7}}]
    return Answer(chunks)


@contextlib.asynccontextmanager
async def remote_server(upstream: FakeUpstream, data_dir: Path, **overrides: object) -> AsyncIterator[RunningServer]:
    """The App as `assistant serve --engine openai --engine-url URL` builds it (no --engine-model: the first
    model the upstream lists)."""
    async with running_upstream(upstream), \
            running_server(None, data_dir, engine="openai", engine_url=upstream.url, **overrides) as server:
        yield server


def client_for(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-unused", base_url=server.http_base, websocket_base_url=server.ws_base,
                       max_retries=0)


async def test_realtime_answer_is_relayed_with_the_upstream_usage(data_dir: Path) -> None:
    upstream = FakeUpstream([text_answer("Tokyo", " it is.", usage={"prompt_tokens": 21, "completion_tokens": 3}),
                             text_answer("Yes.")])
    async with remote_server(upstream, data_dir) as server:
        async with client_for(server).realtime.connect(model="any") as conn:
            await conn.recv()
            await conn.session.update(session={"type": "realtime", "instructions": "Be brief.",
                                               "max_output_tokens": 50})
            await conn.recv()
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Capital of Japan?"}]})
            await conn.response.create()
            events = []
            while not events or events[-1].type != "response.done":
                events.append(await asyncio.wait_for(conn.recv(), 30))
            done = events[-1].response
            assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Tokyo", " it is."]
            assert done.status == "completed" and done.output[0].content[0].text == "Tokyo it is."
            assert (done.usage.input_tokens, done.usage.output_tokens) == (21, 3)
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Sure?"}]})
            await conn.response.create()
            while (await asyncio.wait_for(conn.recv(), 30)).type != "response.done":
                pass
    first, second = upstream.bodies
    assert first["model"] == "fake-model" and first["max_tokens"] == 50
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Capital of Japan?"}]
    assert second["messages"][2:] == [{"role": "assistant", "content": "Tokyo it is."},
                                      {"role": "user", "content": "Sure?"}]


async def test_upstream_tool_calls_become_function_call_items(data_dir: Path) -> None:
    upstream = FakeUpstream([call_answer("get_weather", '{"city": ', '"Paris"}'), text_answer("Sunny in Paris.")])
    async with remote_server(upstream, data_dir) as server:
        ws, _ = await open_session(server)
        await send(ws, {"type": "session.update", "session": {"tools": [WEATHER_TOOL], "tool_choice": "required"}})
        await recv(ws)
        await send(ws, user_item("Weather in Paris?"))
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert deltas == ['{"city": ', '"Paris"}'] and done["name"] == "get_weather"
        assert done["arguments"] == '{"city": "Paris"}' and done["call_id"].startswith("call_")
        response = events[-1]["response"]
        assert response["status"] == "completed" and [item["type"] for item in response["output"]] == ["function_call"]
        await send(ws, {"type": "conversation.item.create", "item": {"type": "function_call_output",
                                                                     "call_id": done["call_id"], "output": "sunny"}})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Sunny in Paris."
        await ws.close()
    first, second = upstream.bodies
    assert first["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                                "description": "Weather in a city.",
                                                                "parameters": WEATHER_TOOL["parameters"]}}]
    assert first["tool_choice"] == "required"
    assert "get_weather" not in first["messages"][0]["content"]  # the upstream describes the tools itself
    call, result = second["messages"][-2:]
    assert call["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "sunny"}


async def test_http_api_streams_text_and_tool_calls(data_dir: Path) -> None:
    upstream = FakeUpstream([text_answer("Hi", "!"), call_answer("get_weather", '{"city": "Rome"}')])
    async with remote_server(upstream, data_dir) as server:
        client = client_for(server)
        schema = {"type": "object", "properties": {"greeting": {"type": "string"}}}
        completion = await client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "hello", "schema": schema}})
        assert completion.choices[0].message.content == "Hi!" and completion.choices[0].finish_reason == "stop"
        assert upstream.bodies[0]["response_format"] == {
            "type": "json_schema", "json_schema": {"name": "hello", "schema": schema, "strict": False}}
        stream = await client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], stream=True,
            stream_options={"include_usage": True},
            tools=[{"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description",
                                                                                  "parameters")}}])
        chunks = [c async for c in stream]
        calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
        assert calls[0].function.name == "get_weather"
        assert "".join(call.function.arguments or "" for call in calls) == '{"city": "Rome"}'
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage.prompt_tokens == 30
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fake-model"]


async def test_images_go_upstream_as_data_urls(data_dir: Path) -> None:
    upstream = FakeUpstream()
    image = data_url(Image.new("RGB", (32, 32), "red"))
    async with remote_server(upstream, data_dir) as server:
        ws, _ = await open_session(server)
        await send(ws, {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Color?"}, {"type": "input_image", "image_url": image, "detail": "low"}]}})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "completed" and done["usage"]["input_token_details"]["image_tokens"] == 85
        await send(ws, {"type": "image.match", "image": {"image_url": image}, "texts": ["red", "blue"]})
        error = await recv(ws)
        assert error["type"] == "error" and error["error"]["code"] == "not_supported_by_engine"
        await ws.close()
    sent = upstream.bodies[0]["messages"][-1]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": image, "detail": "low"}}


async def test_cancel_aborts_the_upstream_request(data_dir: Path) -> None:
    upstream = FakeUpstream([text_answer(*["word "] * 2000, delay=0.02)])
    async with remote_server(upstream, data_dir) as server:
        ws, _ = await open_session(server)
        await send(ws, user_item("Talk."))
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
        await send(ws, {"type": "response.cancel"})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "cancelled"
        for _ in range(100):
            if upstream.num_disconnects:
                break
            await asyncio.sleep(0.05)
        assert upstream.num_disconnects == 1
        await ws.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failures_are_coded_and_retryable(data_dir: Path, stream: bool) -> None:
    upstream = FakeUpstream([Answer(status=500, error={"error": {"message": "CUDA error: secret internals"}})])
    async with remote_server(upstream, data_dir) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{server.http_base}/chat/completions", json={
                "model": "x", "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
        assert "secret" not in json.dumps(error)
        ws, _ = await open_session(server)
        await send(ws, user_item("Hi"))
        await send(ws, {"type": "response.create"})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "failed" and done["status_details"]["error"]["code"] == "upstream_unavailable"
        await ws.close()


async def wait_disconnects(upstream: FakeUpstream, expected: int) -> None:
    for _ in range(100):
        if upstream.num_disconnects >= expected:
            break
        await asyncio.sleep(0.05)
    assert upstream.num_disconnects == expected


async def test_a_client_that_leaves_ends_the_upstream_request(data_dir: Path) -> None:
    upstream = FakeUpstream([text_answer(*["word "] * 2000, delay=0.02)])
    async with remote_server(upstream, data_dir) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{server.http_base}/chat/completions", json={
                    "model": "x", "stream": True, "messages": [{"role": "user", "content": "Talk."}]}) as response:
                async for line in response.aiter_lines():
                    if '"word ' in line:
                        break
        await wait_disconnects(upstream, 1)
        # A Realtime response outlives its connection (for a reconnect) unless the session asks otherwise.
        ws, _ = await open_session(server)
        await send(ws, {"type": "session.update", "session": {"cancel_on_disconnect": True}})
        await send(ws, user_item("Talk."))
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_text.delta")
        await ws.close()
        await wait_disconnects(upstream, 2)
