"""Responses that outlive their connection, and replay on reconnect, over real sockets: raw `websockets`
clients, and the `openai` SDK reconnecting through a TCP proxy that cuts the connection mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection

from assistant.engine.model import ChatModel
from tests.conftest import STREAMING_STEP_SECONDS, RunningServer, paced, running_server
from tests.test_server import TIMEOUT, open_session, recv, recv_until, send, user_item


@pytest.fixture
async def streaming(streaming_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    """A model that never ends by itself, served greedy: every response runs to its max_output_tokens."""
    async with running_server(streaming_model, data_dir, temperature=0, frequency_penalty=0) as running:
        paced(running, STREAMING_STEP_SECONDS)
        yield running


class CuttingProxy:
    """A TCP proxy in front of the server; :meth:`cut` drops every connection through it at once, both sides,
    without a WebSocket close (what a network change or a dying proxy does)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.num_connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, upstream_writer]
        await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer), return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


async def ask(ws: ClientConnection, text: str, max_output_tokens: int) -> dict[str, Any]:
    """Add a user message and start a response; its response.created."""
    await send(ws, user_item(text))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": max_output_tokens}})
    return (await recv_until(ws, "response.created"))[-1]


async def uninterrupted_text(server: RunningServer, text: str, max_output_tokens: int) -> str:
    """The same question in a fresh conversation, streamed to its end without a cut."""
    ws, _ = await open_session(server)
    await ask(ws, text, max_output_tokens)
    done = (await recv_until(ws, "response.done"))[-1]["response"]
    await ws.close()
    return done["output"][0]["content"][0]["text"]


async def wait_stored(server: RunningServer, response_id: str) -> Any:
    """The response as stored once it has ended."""
    for _ in range(int(TIMEOUT / 0.05)):
        stored = server.app.store.get_response(response_id)
        if stored and stored.status != "in_progress":
            return stored
        await asyncio.sleep(0.05)
    raise AssertionError(f"response {response_id} did not end")


async def test_sdk_resumes_through_a_cut_connection_without_gap_or_duplicate(streaming: RunningServer) -> None:
    from openai.types.websocket_reconnection import ReconnectingEvent, ReconnectingOverrides

    question, num_tokens = "Tell me a very long story", 300
    expected = await uninterrupted_text(streaming, question, num_tokens)
    proxy = CuttingProxy(streaming.port)
    await proxy.start()
    state: dict[str, str] = {}
    reconnects: list[int] = []

    def on_reconnecting(event: ReconnectingEvent) -> ReconnectingOverrides:
        reconnects.append(event.close_code)
        return {"extra_query": {"conversation": state["conversation_id"], "last_event_id": state["last_event_id"]}}

    client = AsyncOpenAI(api_key="sk-unused", base_url=f"http://127.0.0.1:{proxy.port}/v1",
                         websocket_base_url=f"ws://127.0.0.1:{proxy.port}/v1")
    try:
        async with client.realtime.connect(model="tiny", on_reconnecting=on_reconnecting) as conn:
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            await conn.response.create(response={"max_output_tokens": num_tokens})
            deltas: list[str] = []
            event_ids: list[str] = []
            num_sessions = 0
            async with asyncio.timeout(TIMEOUT):
                async for event in conn:
                    state["last_event_id"] = event.event_id
                    event_ids.append(event.event_id)
                    if event.type == "session.created":
                        num_sessions += 1
                        state["conversation_id"] = event.session.conversation_id  # type: ignore[union-attr]
                    elif event.type == "response.output_text.delta":
                        deltas.append(event.delta)
                        if len(deltas) == 20 and num_sessions == 1:
                            proxy.cut()  # mid-stream, with the response far from its end
                    elif event.type == "response.done":
                        done = event.response
                        break
    finally:
        await proxy.close()
    assert reconnects == [1006] and num_sessions == 2 and proxy.num_connections == 2
    assert len(event_ids) == len(set(event_ids))  # nothing twice
    assert "".join(deltas) == expected == done.output[0].content[0].text  # type: ignore[union-attr]
    assert done.status == "incomplete" and done.usage.output_tokens == num_tokens  # type: ignore[union-attr]


async def test_reconnecting_after_the_end_replays_the_tail(streaming: RunningServer) -> None:
    ws, session = await open_session(streaming)
    created = await ask(ws, "Tell me a story", 60)
    seen = await recv_until(ws, "response.output_text.delta")
    await ws.close()
    stored = await wait_stored(streaming, created["response"]["id"])
    assert (stored.status, stored.reason) == ("incomplete", "max_output_tokens")  # ran on to its end, alone
    ws, _ = await open_session(streaming, f"?conversation={session['conversation_id']}"
                                          f"&last_event_id={seen[-1]['event_id']}")
    replayed = await recv_until(ws, "response.done")
    assert replayed[0]["type"] == "response.output_text.delta"  # exactly the event after the last one seen
    text = seen[-1]["delta"] + "".join(e["delta"] for e in replayed if e["type"] == "response.output_text.delta")
    assert replayed[-1]["response"]["output"][0]["content"][0]["text"] == text
    item = streaming.app.store.get_item(session["conversation_id"], seen[-1]["item_id"])
    assert item.status == "incomplete" and item.text == text
    await send(ws, user_item("and then?"))  # the connection goes on as usual
    assert (await recv_until(ws, "conversation.item.done"))[-1]["item"]["content"][0]["text"] == "and then?"
    await ws.close()


async def test_a_client_that_saw_only_its_own_events_gets_the_whole_response(streaming: RunningServer) -> None:
    ws, session = await open_session(streaming)
    await send(ws, user_item("Hello"))
    last = (await recv_until(ws, "conversation.item.done"))[-1]
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 20}})
    await ws.close()  # before response.created arrived
    ws, _ = await open_session(streaming, f"?conversation={session['conversation_id']}&last_event_id="
                                          f"{last['event_id']}")
    replayed = await recv_until(ws, "response.done")
    assert replayed[0]["type"] == "response.created" and replayed[-1]["response"]["usage"]["output_tokens"] == 20
    await ws.close()


async def test_a_stale_last_event_id_gets_its_code_then_the_live_events(streaming: RunningServer) -> None:
    ws, session = await open_session(streaming)
    created = await ask(ws, "Tell me a long story", 400)
    await recv_until(ws, "response.output_text.delta")
    await ws.close()
    ws, _ = await open_session(streaming, f"?conversation={session['conversation_id']}&last_event_id=event_gone")
    error = await recv(ws)
    assert (error["error"]["code"], error["error"]["param"]) == ("replay_unavailable", "last_event_id")
    events = await recv_until(ws, "response.done")  # the rest, live; response.done holds the whole output
    assert {e["response_id"] for e in events if e["type"] == "response.output_text.delta"} == {
        created["response"]["id"]}
    assert events[-1]["response"]["usage"]["output_tokens"] == 400
    await ws.close()


async def test_a_stale_last_event_id_after_the_end_gets_its_code(streaming: RunningServer) -> None:
    ws, session = await open_session(streaming)
    await send(ws, user_item("Hello"))
    await recv_until(ws, "conversation.item.done")
    await ws.close()
    ws, _ = await open_session(streaming, f"?conversation={session['conversation_id']}&last_event_id=event_x")
    error = await recv(ws)
    assert (error["error"]["code"], error["error"]["param"]) == ("replay_unavailable", "last_event_id")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})  # the connection works
    assert (await recv_until(ws, "response.done"))[-1]["response"]["usage"]["output_tokens"] == 3
    await ws.close()


async def test_a_running_response_blocks_another_in_its_conversation(streaming: RunningServer) -> None:
    ws, session = await open_session(streaming)
    created = await ask(ws, "Tell me a long story", 4000)
    await ws.close()
    other, _ = await open_session(streaming, f"?conversation={session['conversation_id']}")
    await send(other, {"type": "response.create", "event_id": "again"})
    error = await recv(other)
    assert (error["error"]["code"], error["error"]["event_id"]) == ("conversation_already_has_active_response",
                                                                    "again")
    await send(other, {"type": "response.cancel"})  # not attached: not this connection's to cancel
    assert (await recv(other))["error"]["code"] == "response_cancel_not_active"
    await other.close()
    resumed, _ = await open_session(streaming, f"?conversation={session['conversation_id']}"
                                               f"&last_event_id={created['event_id']}")
    await send(resumed, {"type": "response.cancel"})  # attached: response.cancel always cancels
    done = (await recv_until(resumed, "response.done"))[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled"), done["usage"]
    await resumed.close()


async def test_cancel_on_disconnect_cancels_within_one_decode_step(streaming: RunningServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = streaming.app.engine.inner.engine  # MeteredEngine → AsyncEngine → Engine
    at_abort: dict[str, int] = {}
    abort = engine.abort

    def counting_abort(request_id: str) -> None:
        running = [seq for seq in list(engine.scheduler.running) if seq.request_id == request_id]
        at_abort[request_id] = running[0].num_output_tokens if running else -1
        abort(request_id)

    monkeypatch.setattr(engine, "abort", counting_abort)
    ws, session = await open_session(streaming)
    await send(ws, {"type": "session.update", "session": {"type": "realtime", "cancel_on_disconnect": True}})
    assert (await recv(ws))["session"]["cancel_on_disconnect"] is True
    created = await ask(ws, "Tell me a very long story", 4000)
    await recv_until(ws, "response.output_text.delta")
    await ws.close()
    response_id = created["response"]["id"]
    stored = await wait_stored(streaming, response_id)
    assert (stored.status, stored.reason) == ("cancelled", "client_cancelled")
    assert 0 < at_abort[response_id] <= stored.usage.output_tokens <= at_abort[response_id] + 1


async def test_many_abandoned_responses_stay_within_the_replay_bounds(streaming_model: ChatModel,
                                                                      data_dir: Path) -> None:
    total, per_conversation, num_responses = 40_000, 12_000, 12
    async with running_server(streaming_model, data_dir, temperature=0, replay_total_bytes=total,
                              replay_max_bytes=per_conversation, resume_grace=0.5) as server:
        live = server.app.live
        response_ids = []
        for _ in range(num_responses):
            ws, _ = await open_session(server)
            response_ids.append((await ask(ws, "Tell me a story", 80))["response"]["id"])
            await ws.close()  # abandoned: nobody comes back
        peak = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                while any(conversation.is_running for conversation in live._conversations.values()):
                    peak = max(peak, live.num_bytes)
                    await asyncio.sleep(0.01)
        for response_id in response_ids:  # each ran to its end and was stored, whole
            stored = await wait_stored(server, response_id)
            assert (stored.status, stored.usage.output_tokens) == ("incomplete", 80)
        assert 0 < peak <= total and live.num_bytes <= total
        assert all(c.buffer.num_bytes <= per_conversation for c in live._conversations.values())
        assert live.num_bytes == sum(c.buffer.num_bytes for c in live._conversations.values())
        await asyncio.sleep(0.6)  # the grace period passes
        assert live.get("conv_any") is None and len(live) == 0 and live.num_bytes == 0
        print(f"\n{num_responses} abandoned responses: replay buffers peaked at {peak} bytes (bound {total})")



async def test_a_function_call_is_replayed_too(streaming: RunningServer) -> None:
    from tests.test_server_tools import NOTE

    ws, session = await open_session(streaming)
    await send(ws, user_item("Take a long note."))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"tools": [NOTE], "tool_choice": "required",
                                                            "max_output_tokens": 300}})
    seen = await recv_until(ws, "response.function_call_arguments.delta")
    await ws.close()
    ws, _ = await open_session(streaming, f"?conversation={session['conversation_id']}"
                                          f"&last_event_id={seen[-1]['event_id']}")
    replayed = await recv_until(ws, "response.done")
    arguments = "".join(e["delta"] for e in seen + replayed if e["type"] == "response.function_call_arguments.delta")
    [done] = [e for e in replayed if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == arguments and done["call_id"] == seen[-1]["call_id"]
    item = streaming.app.store.get_item(session["conversation_id"], done["item_id"])
    assert item.type == "function_call" and item.arguments == arguments
    await ws.close()
