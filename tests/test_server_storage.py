"""Storage faults under a running server: a full SQLite disk (for real, through ``PRAGMA max_page_count``) and a
PostgreSQL cluster stopped and started again mid-session. Clients get the coded, retryable
``storage_unavailable``; reads go on; what a client was told is what the database holds once storage is back;
the server recovers by itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
from sqlalchemy import select
from websockets.asyncio.client import ClientConnection

from assistant.engine.model import ChatModel
from assistant.store import Store
from assistant.store_models import ResponseRow
from tests.conftest import RunningServer, running_server
from tests.storage_fixtures import full_disk, private_cluster
from tests.test_http_api import post
from tests.test_server import open_session, recv, recv_until, send, start_long_response, user_item

BIG_TEXT = "x" * 100_000  # needs pages a full disk does not have


def assert_storage_unavailable(error: dict[str, Any]) -> None:
    assert (error["code"], error["type"]) == ("storage_unavailable", "server_error")
    assert "Retry later" in error["message"]


async def stream_until_storage_fails(ws: ClientConnection, text: str) -> tuple[dict[str, Any], str]:
    """The response.done of a response whose storage failed while it streamed, and all the text it sent (``text``
    so far)."""
    while True:
        event = await recv(ws)
        if event["type"] == "response.output_text.delta":
            text += event["delta"]
        if event["type"] == "response.done":
            return event["response"], text


def assert_told_and_stored_agree(store: Store, conversation_id: str, response: dict[str, Any], text: str) -> None:
    assert response["status"] == "failed"
    assert_storage_unavailable(response["status_details"]["error"])
    [item] = response["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == text and text
    record = store.get_response(response["id"])
    assert record is not None and record.status == "failed" and record.output_item_ids == (item["id"],)
    stored = store.get_item(conversation_id, item["id"])
    assert stored.status == "incomplete" and stored.text == text


async def test_full_disk_refuses_new_items_with_a_code_and_reads_go_on(server: RunningServer) -> None:
    ws, session = await open_session(server)
    await send(ws, {"type": "conversation.item.create", "item": {**user_item("kept")["item"], "id": "kept"}})
    await recv_until(ws, "conversation.item.done")
    with full_disk(server.app.store):
        await send(ws, {**user_item(BIG_TEXT), "event_id": "e1"})
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert_storage_unavailable(error)
        assert error["event_id"] == "e1"
        await send(ws, {"type": "conversation.item.retrieve", "item_id": "kept"})
        assert (await recv(ws))["item"]["content"][0]["text"] == "kept"
    await send(ws, {**user_item(BIG_TEXT), "event_id": "e2"})  # space is back: no restart
    assert (await recv_until(ws, "conversation.item.done"))[-1]["item"]["content"][0]["text"] == BIG_TEXT
    await ws.close()


async def test_full_disk_mid_response_fails_it_and_stores_what_the_client_was_told(
        streaming_server: RunningServer) -> None:
    server = streaming_server
    store = server.app.store
    ws, session = await open_session(server)
    started = await start_long_response(ws)
    with full_disk(store, filled=True):
        response, text = await stream_until_storage_fails(ws, started[-1]["delta"])
        assert response["id"] == started[0]["response"]["id"] and response["usage"]["output_tokens"] < 1000
        record = store.get_response(response["id"])  # reads go on; the final writes wait for space
        assert record is not None and record.status == "in_progress" and len(server.app.pending) > 0
    assert server.app.pending.wait_until_empty(30)
    assert_told_and_stored_agree(store, session["conversation_id"], response, text)
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] != "failed"
    await ws.close()


async def test_full_disk_on_the_http_api_is_a_503_with_the_code(server: RunningServer) -> None:
    with full_disk(server.app.store, filled=True):
        reply = await post(server, {"messages": [{"role": "user", "content": "hi"}], "store": True,
                                    "max_tokens": 2})
    assert reply.status_code == 503
    assert_storage_unavailable(reply.json()["error"])
    reply = await post(server, {"messages": [{"role": "user", "content": "hi"}], "store": True, "max_tokens": 2})
    assert reply.status_code == 200 and reply.headers["X-Conversation-Id"]


async def test_postgresql_restarted_under_the_server(streaming_model: ChatModel, data_dir: Path) -> None:
    """With a model that streams greedily for seconds, whose text PostgreSQL can hold (no NUL)."""
    with private_cluster() as cluster:
        setup = Store(cluster.url)
        setup.upgrade()
        setup.close()
        async with running_server(streaming_model, data_dir, database_url=cluster.url, temperature=0) as server:
            store = server.app.store
            ws, session = await open_session(server)
            await send(ws, user_item("before"))
            await recv_until(ws, "conversation.item.done")

            cluster.stop()
            await send(ws, {**user_item("while down"), "event_id": "down"})
            assert_storage_unavailable((await recv_until(ws, "error"))[-1]["error"])
            await send(ws, {"type": "response.create", "event_id": "r"})  # it cannot read the conversation
            refused = await recv(ws)
            assert refused["type"] == "error" and refused["error"]["event_id"] == "r"
            assert_storage_unavailable(refused["error"])
            cluster.start()
            await send(ws, user_item("after"))  # the pool pings, reconnects: no restart
            await recv_until(ws, "conversation.item.done")

            await send(ws, {"type": "response.create"})
            first = (await recv_until(ws, "response.output_text.delta"))[-1]
            cluster.stop()
            response, text = await stream_until_storage_fails(ws, first["delta"])
            cluster.start()
            assert server.app.pending.wait_until_empty(30)
            assert_told_and_stored_agree(store, session["conversation_id"], response, text)
            assert [item.text for item in store.list_items(session["conversation_id"])] == ["before", "after", text]
            await ws.close()

            # Chat Completions with store: true, the database gone before the answer is stored.
            body = {"messages": [{"role": "user", "content": "hi"}], "store": True, "stream": True,
                    "max_tokens": 600}
            async with httpx.AsyncClient(timeout=60) as http:
                async with http.stream("POST", server.http_base + "/chat/completions", json=body) as reply:
                    conversation_id = reply.headers["X-Conversation-Id"]
                    chunks = []
                    async for line in reply.aiter_lines():
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line.removeprefix("data: ")))
                            if len(chunks) == 2:
                                cluster.stop()
            assert_storage_unavailable(chunks[-1]["error"])
            streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks[:-1])
            cluster.start()
            assert server.app.pending.wait_until_empty(30)
            [question, answer] = store.list_items(conversation_id)
            assert (answer.status, answer.text) == ("incomplete", streamed) and streamed
            with store.engine.connect() as connection:
                statuses = connection.execute(select(ResponseRow.status).where(
                    ResponseRow.conversation_id == conversation_id)).scalars().all()
            assert statuses == ["failed"]
