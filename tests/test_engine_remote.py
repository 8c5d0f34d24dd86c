"""The remote engine against a scripted OpenAI-compatible server on loopback (tests/remote_fixtures.py):
streaming, images, abort, timeouts, a dead or refusing upstream, overload."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from assistant.engine.remote import RemoteEngine
from assistant.engine.remote_wire import data_url
from assistant.engine.request import (ChatMessage, Finished, GenerationRequest, ImageChunk, InlineImages,
                                      ScoreRequest, TextChunk, TokenDelta)
from assistant.engine.scheduler import EngineOverloaded
from tests.process_fixtures import free_port
from tests.remote_fixtures import Answer, FakeUpstream, chunk, running_upstream, text_answer
from tests.test_engine_remote_wire import PNG, request

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


async def test_an_abort_before_the_request_starts_still_ends_it() -> None:
    engine = RemoteEngine(f"http://127.0.0.1:{free_port()}/v1", "m")
    events = engine.generate(request())
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0)  # generate has created the request's task, which has not run yet
    engine.abort("resp_1")
    assert await asyncio.wait_for(first, 5) == Finished("cancelled")
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()
    assert engine.num_running == 0
