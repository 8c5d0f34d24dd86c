"""Graceful drain: the Drain's bookkeeping alone, then real `assistant serve` processes stopped with SIGTERM while
responses stream to raw `websockets` clients and the `openai` SDK.

The served model is the tiny random Llama made ``never_ends`` (its end-of-sequence logit always 0, below the best
of the other 300-odd random ones), so a greedy answer never ends by itself and a response lasts exactly as long
as its ``max_output_tokens`` (or the context, here seconds of decoding) says. Production code is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from assistant.drain import Drain
from assistant.errors import ServerShuttingDown
from tests.engine_fixtures import save_tiny_chat_model
from tests.process_fixtures import Served, serve

TIMEOUT = 60
CONTEXT_TOKENS = 16384


# ---------------------------------------------------------------- the Drain alone


async def test_drain_waits_for_responses_that_finish_in_time() -> None:
    drain = Drain(timeout_s=10)
    cuts: list[str] = []
    task = asyncio.create_task(asyncio.sleep(0.05))
    drain.track(task, lambda: cuts.append("cut"))
    report = await drain.run()
    assert task.done() and not cuts
    assert (report.num_finished, report.num_cut) == (1, 0)
    with pytest.raises(ServerShuttingDown):
        drain.admit()


async def test_drain_cuts_what_is_still_running_at_the_timeout() -> None:
    drain = Drain(timeout_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(stop.wait())
    drain.track(task, stop.set)  # cutting a response makes it end (soon)
    report = await asyncio.wait_for(drain.run(), 5)
    assert task.done() and (report.num_finished, report.num_cut) == (0, 1)


async def test_a_second_signal_stops_the_waiting() -> None:
    drain = Drain(timeout_s=3600)
    stop = asyncio.Event()
    drain.track(asyncio.create_task(stop.wait()), stop.set)
    running = asyncio.create_task(drain.run())
    await asyncio.sleep(0.05)
    assert not running.done() and drain.is_draining
    drain.hurry()
    report = await asyncio.wait_for(running, 5)
    assert report.num_cut == 1


async def test_a_response_started_as_the_drain_cuts_is_cut_too() -> None:
    drain = Drain(timeout_s=0)
    first, late = asyncio.Event(), asyncio.Event()

    def cut_first() -> None:  # the first response's end lets a late one (admitted before the drain) start
        first.set()
        drain.track(asyncio.create_task(late.wait()), late.set)

    drain.track(asyncio.create_task(first.wait()), cut_first)
    report = await asyncio.wait_for(drain.run(), 5)
    assert late.is_set() and report.num_cut == 2


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose greedy answers never end by themselves (see the module docstring)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("endless"), max_position_embeddings=CONTEXT_TOKENS,
                                never_ends=True)


def http_client(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="sk-unused", base_url=f"http://127.0.0.1:{served.port}/v1", max_retries=0,
                              timeout=TIMEOUT)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def recv_until(ws: ClientConnection, type_: str) -> list[dict[str, Any]]:
    events = []
    while True:
        events.append(await recv(ws))
        if events[-1]["type"] == type_:
            return events


async def open_session(served: Served) -> tuple[ClientConnection, str]:
    """A Realtime connection with one user message stored; returns it and its conversation id."""
    ws = await connect(served.realtime_url)
    created = await recv(ws)
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}}))
    await recv_until(ws, "conversation.item.done")
    return ws, created["session"]["conversation_id"]


async def start_response(ws: ClientConnection, max_output_tokens: int | str) -> list[dict[str, Any]]:
    """Ask for a response and wait for its first delta."""
    await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": max_output_tokens}}))
    return await recv_until(ws, "response.output_text.delta")


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes the connection; its close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert ws.close_code is not None
    return ws.close_code


def stored_response(database: Path, response_id: str) -> tuple[str, str | None, int]:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT status, reason, output_tokens FROM responses WHERE id = ?", (response_id,)).fetchone()
    assert row is not None, response_id
    return row


def num_stored_in_progress(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT count(*) FROM responses WHERE status = 'in_progress'").fetchone()[0]


def stored_items(database: Path, conversation_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT role, status FROM items WHERE conversation_id = ? ORDER BY position",
                          (conversation_id,)).fetchall()


async def test_sigterm_lets_a_running_response_finish_then_closes_with_1012(endless_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    """(a) A long drain timeout: the running response ends by itself; meanwhile an open connection's new
    response.create is refused (retryable, coded), as is a chat completion on a kept-alive HTTP connection, and a
    new connection is refused; then 1012, exit 0."""
    async with serve(endless_model_dir, tmp_path, "--drain-timeout", "120") as served:
        ws, conversation_id = await open_session(served)
        idle, _ = await open_session(served)
        client = http_client(served)
        assert [model.id async for model in client.models.list()]  # the connection the SDK keeps alive
        num_tokens = 3000  # seconds of decoding: still running when SIGTERM arrives, done long before 120 s
        started = await start_response(ws, num_tokens)
        response_id = started[0]["response"]["id"]
        served.process.send_signal(signal.SIGTERM)
        assert "draining: 1 responses running" in await served.wait_for_line("draining:")

        await idle.send(json.dumps({"type": "response.create", "event_id": "late"}))
        error = (await recv_until(idle, "error"))[-1]["error"]
        assert error["code"] == "server_shutting_down" and error["event_id"] == "late"
        assert error["type"] == "server_error"
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        assert info.value.status_code == 503 and info.value.code == "server_shutting_down"
        with pytest.raises(OSError):  # the listening socket is closed: refused, not queued
            await connect(served.realtime_url, open_timeout=5)

        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "incomplete" and done["status_details"]["reason"] == "max_output_tokens"
        assert done["usage"]["output_tokens"] == num_tokens
        assert await close_code(ws) == 1012 and await close_code(idle) == 1012
        assert await served.exit_code() == 0
    assert "drained: 1 responses finished, 0 cut" in "\n".join(served.lines)
    assert stored_response(served.database, response_id) == ("incomplete", "max_output_tokens", num_tokens)
    assert stored_items(served.database, conversation_id) == [("user", "completed"), ("assistant", "incomplete")]


async def test_sigterm_cuts_what_outlasts_the_drain_timeout(endless_model_dir: Path, tmp_path: Path) -> None:
    """(b) A short drain timeout: a Realtime response and two chat completions, streamed and whole, still running
    when it ends are cut: incomplete/server_shutdown on the wire and in the database; the stream ends in a coded
    error the SDK raises, the whole one is a 503 with the same code; then 1012, exit 0."""
    async with serve(endless_model_dir, tmp_path, "--drain-timeout", "1", "--max-output-tokens", "0") as served:
        ws, conversation_id = await open_session(served)
        started = await start_response(ws, "inf")
        response_id = started[0]["response"]["id"]
        client = http_client(served)
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], stream=True, store=True)
        chunks = stream.__aiter__()
        assert (await anext(chunks)).choices[0].delta.role == "assistant"
        streamed: list[str] = []
        while not streamed:
            streamed += [choice.delta.content or "" for choice in (await anext(chunks)).choices]
        whole = asyncio.create_task(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], store=True))
        while num_stored_in_progress(served.database) < 3:  # the whole one has started too
            await asyncio.sleep(0.05)

        served.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as info:
            async for chunk in chunks:
                assert chunk.choices[0].finish_reason is None, "the stream was cut: no finish_reason"
        assert info.value.code == "server_shutting_down"
        with pytest.raises(openai.InternalServerError) as info:
            await whole
        assert info.value.status_code == 503 and info.value.code == "server_shutting_down"

        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "incomplete"
        assert done["status_details"] == {"type": "incomplete", "reason": "server_shutdown"}
        assert done["usage"]["output_tokens"] > 0
        text = done["output"][0]["content"][0]["text"]
        assert await close_code(ws) == 1012
        assert await served.exit_code() == 0
    assert "drained: 0 responses finished, 3 cut" in "\n".join(served.lines)
    status, reason, num_tokens = stored_response(served.database, response_id)
    assert (status, reason, num_tokens) == ("incomplete", "server_shutdown", done["usage"]["output_tokens"])
    assert stored_items(served.database, conversation_id) == [("user", "completed"), ("assistant", "incomplete")]
    with sqlite3.connect(served.database) as db:
        assert db.execute("SELECT text FROM content_parts JOIN items ON items.pk = content_parts.item_pk "
                          "WHERE items.item_id = ?", (done["output"][0]["id"],)).fetchone() == (text,)
        statuses = db.execute("SELECT status, reason FROM responses WHERE id != ?", (response_id,)).fetchall()
    assert statuses == [("incomplete", "server_shutdown")] * 2  # the chat completions, stored with store: true


async def test_a_second_signal_cuts_at_once(endless_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM, then SIGINT (Ctrl-C) while the drain waits: no waiting out the 600 s."""
    async with serve(endless_model_dir, tmp_path, "--drain-timeout", "600") as served:
        ws, _ = await open_session(served)
        await start_response(ws, "inf")
        served.process.send_signal(signal.SIGTERM)
        await served.wait_for_line("draining:")
        served.process.send_signal(signal.SIGINT)
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status_details"]["reason"] == "server_shutdown"
        assert await close_code(ws) == 1012
        assert await asyncio.wait_for(served.exit_code(), 30) == 0
    assert "drained: 0 responses finished, 1 cut" in "\n".join(served.lines)
