"""The official `openai` SDK's Realtime clients (GA and beta) against a loopback server."""

from __future__ import annotations

import asyncio
from typing import Any

from openai import AsyncOpenAI

from tests.conftest import RunningServer

TIMEOUT = 60


def client_for(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-unused", base_url=server.http_base, websocket_base_url=server.ws_base)


async def collect(conn: Any, until: str) -> list[Any]:
    events = []
    while True:
        event = await asyncio.wait_for(conn.recv(), TIMEOUT)
        events.append(event)
        if event.type == until:
            return events


async def test_ga_client_streams_an_answer(server: RunningServer) -> None:
    async with client_for(server).realtime.connect(model="tiny") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        conversation_id = created.session.conversation_id  # type: ignore[union-attr]
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "instructions": "Answer briefly.", "max_output_tokens": 10})
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.instructions == "Answer briefly."
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hello?"}]})
        await conn.response.create()
        events = await collect(conn, "response.done")
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        done = events[-1].response
        assert deltas and done.status in ("completed", "incomplete")
        assert done.usage.output_tokens == len(deltas) or done.usage.output_tokens >= len(deltas)
        assert done.output[0].content[0].text == "".join(deltas)
        assert done.usage.input_token_details.image_tokens == 0
    # Resume with the SDK's extra_query: the conversation's items are there.
    async with client_for(server).realtime.connect(model="tiny",
                                                   extra_query={"conversation": conversation_id}) as conn:
        created = await conn.recv()
        assert created.session.conversation_id == conversation_id  # type: ignore[union-attr]
        await conn.conversation.item.retrieve(item_id=done.output[0].id)
        retrieved = await collect(conn, "conversation.item.retrieved")
        assert retrieved[-1].item.content[0].text == "".join(deltas)


async def test_ga_client_cancel(server: RunningServer) -> None:
    async with client_for(server).realtime.connect(model="tiny") as conn:
        await conn.recv()
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Go on forever"}]})
        await conn.response.create(response={"temperature": 1.0, "seed": 5})  # type: ignore[typeddict-unknown-key]
        await collect(conn, "response.output_text.delta")
        await conn.response.cancel()
        done = (await collect(conn, "response.done"))[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"


async def test_ga_client_gets_coded_error(server: RunningServer) -> None:
    async with client_for(server).realtime.connect(model="tiny") as conn:
        await conn.recv()
        await conn.conversation.item.retrieve(item_id="item_missing", event_id="mine")
        error = (await collect(conn, "error"))[-1].error
        assert (error.code, error.param, error.event_id) == ("item_not_found", "item_id", "mine")


async def test_beta_client_streams_an_answer(server: RunningServer) -> None:
    async with client_for(server).beta.realtime.connect(model="tiny") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        await conn.session.update(session={"modalities": ["text"], "max_response_output_tokens": 8})
        assert (await conn.recv()).type == "session.updated"
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hi"}]})
        assert (await conn.recv()).type == "conversation.item.created"
        await conn.response.create()
        events = await collect(conn, "response.done")
        deltas = [e.delta for e in events if e.type == "response.text.delta"]
        text_done = [e for e in events if e.type == "response.text.done"]
        assert deltas and text_done and text_done[0].text == "".join(deltas)
        assert events[-1].response.usage.output_tokens <= 8


async def test_sdk_reconnects_into_the_same_conversation_after_a_restart(tiny_model: Any, data_dir: Any) -> None:
    """The SDK's on_reconnecting hook points the new connection at the stored conversation."""
    from openai.types.websocket_reconnection import ReconnectingEvent, ReconnectingOverrides

    from tests.conftest import running_server

    conversation: dict[str, str] = {}
    reconnects: list[int] = []

    def on_reconnecting(event: ReconnectingEvent) -> ReconnectingOverrides:
        reconnects.append(event.close_code)
        return {"extra_query": {"conversation": conversation["id"]}}

    async with running_server(tiny_model, data_dir) as first:
        port = first.port
        client = client_for(first)
        conn_manager = client.realtime.connect(model="tiny", on_reconnecting=on_reconnecting)
        conn = await conn_manager.enter()
        created = await conn.recv()
        conversation["id"] = created.session.conversation_id  # type: ignore[union-attr]
        await conn.conversation.item.create(item={"id": "item_before", "type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "before the drop"}]})
        await collect(conn, "conversation.item.done")
    # The server went away (close 1012, service restart); a new one comes up on the same port and database.
    async with running_server(tiny_model, data_dir, port=port):
        events = conn.__aiter__()  # the SDK reconnects while iterating
        resumed = await asyncio.wait_for(anext(events), TIMEOUT)
        assert resumed.type == "session.created"
        assert resumed.session.conversation_id == conversation["id"]  # type: ignore[union-attr]
        assert reconnects and reconnects[0] == 1012
        await conn.conversation.item.retrieve(item_id="item_before")
        item = (await collect(conn, "conversation.item.retrieved"))[-1].item
        assert item.content[0].text == "before the drop"
        await conn_manager.__aexit__(None, None, None)
