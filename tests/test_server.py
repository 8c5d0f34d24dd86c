"""The server over real loopback sockets, with raw `websockets` clients and a tiny random model."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from assistant.config import ConfigError, load_config
from assistant.server import tls_context
from tests.conftest import RunningServer, running_server
from tests.tls_fixtures import client_context, make_self_signed_cert

TIMEOUT = 60


async def recv(ws: ClientConnection, *, rate_limits: bool = False) -> dict[str, Any]:
    """The next event; ``rate_limits.updated`` (one per response, tested on its own) is skipped unless asked for."""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if rate_limits or event["type"] != "rate_limits.updated":
            return event


async def recv_until(ws: ClientConnection, type_: str) -> list[dict[str, Any]]:
    """Every event up to and including the first of ``type_``."""
    events = []
    while True:
        event = await recv(ws)
        events.append(event)
        if event["type"] == type_:
            return events


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


def user_item(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "conversation.item.create", **extra,
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


async def open_session(server: RunningServer, query: str = "", **kwargs: Any) -> tuple[ClientConnection, dict]:
    ws = await connect(server.realtime_url + query, **kwargs)
    created = await recv(ws)
    assert created["type"] == "session.created"
    return ws, created["session"]


async def test_session_created_and_update(server: RunningServer) -> None:
    ws, session = await open_session(server)
    assert session["type"] == "realtime" and session["conversation_id"].startswith("conv_")
    await send(ws, {"type": "session.update", "event_id": "u1",
                    "session": {"type": "realtime", "instructions": "Be terse.", "temperature": 0, "seed": 3,
                                "max_output_tokens": 8, "stop": ["xyz"]}})
    updated = await recv(ws)
    assert updated["type"] == "session.updated"
    s = updated["session"]
    assert (s["instructions"], s["temperature"], s["seed"], s["max_output_tokens"], s["stop"]) == (
        "Be terse.", 0, 3, 8, ["xyz"])
    await ws.close()


async def test_full_response_sequence_and_usage(server: RunningServer) -> None:
    ws, session = await open_session(server)
    await send(ws, {"type": "session.update", "session": {"temperature": 0, "max_output_tokens": 12}})
    await recv(ws)
    await send(ws, user_item("Hello world"))
    added, done = await recv(ws), await recv(ws)
    assert [added["type"], done["type"]] == ["conversation.item.added", "conversation.item.done"]
    assert added["previous_item_id"] is None and added["item"]["content"][0]["text"] == "Hello world"
    await send(ws, {"type": "response.create"})
    events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    head = ["response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
            "conversation.item.done", "response.done"]
    assert kinds[:4] == head and kinds[-5:] == tail
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert set(kinds[4:-5]) == {"response.output_text.delta"}
    text = "".join(e["delta"] for e in deltas)
    assert text == events[-5]["text"]
    response = events[-1]["response"]
    assert response["status"] in ("completed", "incomplete")
    usage = response["usage"]
    assert usage["output_tokens"] <= 12 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert response["output"][0]["content"][0] == {"type": "output_text", "text": text}
    assert len({e["event_id"] for e in events}) == len(events)
    # The assistant item was stored with its text.
    item_id = events[1]["item"]["id"]
    await send(ws, {"type": "conversation.item.retrieve", "item_id": item_id})
    retrieved = await recv(ws)
    assert retrieved["item"]["content"][0]["text"] == text and retrieved["item"]["role"] == "assistant"
    stored = server.app.store.get_response(response["id"])
    assert stored is not None and stored.usage.output_tokens == usage["output_tokens"]
    assert stored.duration_ms is not None and stored.duration_ms > 0
    await ws.close()


async def test_max_output_tokens_gives_incomplete(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, user_item("Hello"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3, "temperature": 0}})
    events = await recv_until(ws, "response.done")
    response = events[-1]["response"]
    if response["status"] == "incomplete":
        assert response["status_details"]["reason"] == "max_output_tokens"
        assert response["usage"]["output_tokens"] == 3
    else:  # the random model may end with eos first
        assert response["status"] == "completed" and response["usage"]["output_tokens"] <= 3
    await ws.close()


@pytest.mark.parametrize("frame, code, param", [
    ("{not json", "invalid_json", None),
    (json.dumps({"type": "bogus.event", "event_id": "e1"}), "unknown_event_type", "type"),
    (json.dumps({"type": "conversation.item.create", "event_id": "e2", "item": {"role": "user"}}),
     "missing_required_parameter", "item.content"),
    (json.dumps({"type": "session.update", "event_id": "e3", "session": {"temperature": "hot"}}),
     "invalid_type", "session.temperature"),
    (json.dumps({"type": "conversation.item.retrieve", "event_id": "e4", "item_id": "nope"}),
     "item_not_found", "item_id"),
    (json.dumps({"type": "conversation.item.delete", "event_id": "e5", "item_id": "nope"}),
     "item_not_found", "item_id"),
    (json.dumps({**user_item("x"), "event_id": "e6", "previous_item_id": "nope"}),
     "item_not_found", "previous_item_id"),
    (json.dumps({"type": "response.cancel", "event_id": "e7"}), "response_cancel_not_active", None),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e8", "audio": "AAAA"}), "audio_not_supported", "type"),
    (json.dumps({"type": "input_audio_buffer.commit", "event_id": "e9"}), "audio_not_supported", "type"),
    (json.dumps({"type": "conversation.item.truncate", "event_id": "e10", "item_id": "x", "content_index": 0,
                 "audio_end_ms": 0}), "audio_not_supported", "type"),
    ('{"type": "session.update", "event_id": "e11", "session": {"temperature": %s}}' % ("9" * 5000),
     "invalid_value", "session.temperature"),
])
async def test_bad_events_get_coded_errors_and_lose_nothing(
        server: RunningServer, frame: str, code: str, param: str | None) -> None:
    ws, session = await open_session(server)
    await send(ws, {**user_item("keep me"), "event_id": "first"})
    kept = (await recv_until(ws, "conversation.item.done"))[-1]["item"]["id"]
    await ws.send(frame)
    error = await recv(ws)
    assert error["type"] == "error"
    assert error["error"]["code"] == code and error["error"]["param"] == param
    sent = json.loads(frame, parse_int=str) if frame.startswith("{\"") else {}
    assert error["error"]["event_id"] == sent.get("event_id")
    assert "Traceback" not in error["error"]["message"]
    # The connection is still usable and nothing stored was lost.
    await send(ws, {"type": "conversation.item.retrieve", "item_id": kept})
    assert (await recv(ws))["item"]["content"][0]["text"] == "keep me"
    assert [i.id for i in server.app.store.list_items(session["conversation_id"])] == [kept]
    await ws.close()


async def test_duplicate_item_id_is_refused(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, user_item("a", event_id="x") | {"item": {**user_item("a")["item"], "id": "item_same"}})
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "conversation.item.create", "event_id": "dup",
                    "item": {**user_item("b")["item"], "id": "item_same"}})
    error = await recv(ws)
    assert error["error"]["code"] == "item_already_exists" and error["error"]["event_id"] == "dup"
    await ws.close()


async def test_insert_positions_and_delete(server: RunningServer) -> None:
    ws, session = await open_session(server)
    for name in ("a", "b"):
        await send(ws, {"type": "conversation.item.create",
                        "item": {**user_item(name)["item"], "id": f"item_{name}"}})
        await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "conversation.item.create", "previous_item_id": "root",
                    "item": {**user_item("first")["item"], "id": "item_first"}})
    added = await recv(ws)
    assert added["previous_item_id"] is None
    await recv(ws)
    await send(ws, {"type": "conversation.item.create", "previous_item_id": "item_a",
                    "item": {"id": "item_sys", "type": "message", "role": "system",
                             "content": [{"type": "input_text", "text": "sys"}]}})
    assert (await recv(ws))["previous_item_id"] == "item_a"
    await recv(ws)
    ids = [i.id for i in server.app.store.list_items(session["conversation_id"])]
    assert ids == ["item_first", "item_a", "item_sys", "item_b"]
    await send(ws, {"type": "conversation.item.delete", "item_id": "item_a", "event_id": "d"})
    assert (await recv(ws)) | {"event_id": None} == {"type": "conversation.item.deleted", "item_id": "item_a",
                                                       "event_id": None}
    ids = [i.id for i in server.app.store.list_items(session["conversation_id"])]
    assert ids == ["item_first", "item_sys", "item_b"]
    await ws.close()


async def start_long_response(ws: ClientConnection) -> list[dict[str, Any]]:
    """Start a response that runs to the end of the context (on the streaming model), and wait for its first
    delta. (A seeded sampled answer of the tiny model used to serve, until a new sampler ended it early.)"""
    await send(ws, user_item("Tell me a very long story"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create"})
    return await recv_until(ws, "response.output_text.delta")


async def test_cancel_stops_generation(streaming_server: RunningServer) -> None:
    server = streaming_server
    ws, session = await open_session(server)
    started = await start_long_response(ws)
    response_id = started[0]["response"]["id"]
    await send(ws, {"type": "response.cancel", "response_id": response_id})
    events = await recv_until(ws, "response.done")
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"]["reason"] == "client_cancelled"
    # Stopped long before the context (4096 positions) was full.
    assert response["usage"]["output_tokens"] < 2000
    item = server.app.store.get_item(session["conversation_id"], started[1]["item"]["id"])
    assert item.status == "incomplete"
    stored = server.app.store.get_response(response_id)
    assert stored is not None and stored.status == "cancelled"
    await ws.close()


async def test_one_response_at_a_time(streaming_server: RunningServer) -> None:
    ws, _ = await open_session(streaming_server)
    await start_long_response(ws)
    await send(ws, {"type": "response.create", "event_id": "second"})
    events = await recv_until(ws, "error")
    assert events[-1]["error"]["code"] == "conversation_already_has_active_response"
    assert events[-1]["error"]["event_id"] == "second"
    await send(ws, {"type": "response.cancel"})
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "cancelled"
    await ws.close()


async def test_resume_conversation_sees_history(server: RunningServer) -> None:
    ws, session = await open_session(server)
    conversation_id = session["conversation_id"]
    await send(ws, {"type": "conversation.item.create", "item": {**user_item("remember this")["item"], "id": "m1"}})
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 2, "temperature": 0}})
    first = (await recv_until(ws, "response.done"))[-1]["response"]["usage"]["input_tokens"]
    await ws.close()

    ws, session = await open_session(server, f"?conversation={conversation_id}")
    assert session["conversation_id"] == conversation_id
    await send(ws, {"type": "conversation.item.retrieve", "item_id": "m1"})
    assert (await recv(ws))["item"]["content"][0]["text"] == "remember this"
    await send(ws, user_item("and this"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 2, "temperature": 0}})
    second = (await recv_until(ws, "response.done"))[-1]["response"]["usage"]["input_tokens"]
    assert second > first  # the prompt holds the earlier turns
    await ws.close()


async def test_unknown_conversation_is_refused(server: RunningServer) -> None:
    ws = await connect(server.realtime_url + "?conversation=conv_nope")
    error = await recv(ws)
    assert error["type"] == "error" and error["error"]["code"] == "conversation_not_found"
    with pytest.raises(ConnectionClosed) as info:
        await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_history_survives_restart(tiny_model: Any, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir) as first:
        ws, session = await open_session(first)
        await send(ws, {"type": "conversation.item.create", "item": {**user_item("before restart")["item"],
                                                                     "id": "kept"}})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create", "response": {"max_output_tokens": 4, "temperature": 0}})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        reply_id = done["output"][0]["id"]
        await ws.close()
    async with running_server(tiny_model, data_dir) as second:
        ws, resumed = await open_session(second, f"?conversation={session['conversation_id']}")
        await send(ws, {"type": "conversation.item.retrieve", "item_id": "kept"})
        assert (await recv(ws))["item"]["content"][0]["text"] == "before restart"
        await send(ws, {"type": "conversation.item.retrieve", "item_id": reply_id})
        reply = (await recv(ws))["item"]
        assert reply["role"] == "assistant" and reply["content"][0]["text"] == done["output"][0]["content"][0]["text"]
        await ws.close()


async def test_beta_dialect_names(server: RunningServer) -> None:
    ws, session = await open_session(server, additional_headers={"OpenAI-Beta": "realtime=v1"})
    assert "modalities" in session and "type" not in session
    await send(ws, user_item("hi"))
    assert (await recv(ws))["type"] == "conversation.item.created"
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})
    kinds = [e["type"] for e in await recv_until(ws, "response.done")]
    assert "response.text.done" in kinds and "conversation.item.done" not in kinds
    await ws.close()


async def test_browser_subprotocol_is_selected(server: RunningServer) -> None:
    ws = await connect(server.realtime_url, subprotocols=["realtime", "openai-insecure-api-key.k"])  # type: ignore[list-item]
    assert ws.subprotocol == "realtime"
    assert (await recv(ws))["type"] == "session.created"
    await ws.close()


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_message_too_large_closes_with_the_code_and_limit(tiny_model: Any, data_dir: Path,
                                                                 compression: str | None) -> None:
    """A message over the limit is refused from its header (inflated size when compressed, the running total when
    fragmented): close 1009 with the code and the limit in the reason. One at the limit is taken."""
    async with running_server(tiny_model, data_dir, max_message_bytes=1000) as small:
        at_limit = json.dumps(user_item(""))
        at_limit = json.dumps(user_item("x" * (1000 - len(at_limit))))
        assert len(at_limit.encode()) == 1000
        over_limit = [json.dumps(user_item("x" * 1200)),
                      json.dumps(user_item("é" * 500), ensure_ascii=False),  # < 1000 characters, > 1000 bytes
                      [json.dumps(user_item("y" * 1100))[i:i + 100] for i in range(0, 1300, 100)]]  # fragments
        for message in over_limit:
            ws, _ = await open_session(small, compression=compression)
            await ws.send(at_limit)
            assert (await recv(ws))["type"] == "conversation.item.added"
            await recv(ws)  # conversation.item.done
            await ws.send(message)
            with pytest.raises(ConnectionClosed):
                await recv(ws)
            assert ws.close_code == 1009
            assert ws.close_reason == "message_too_large: messages are limited to 1000 bytes"


async def test_connection_limit(tiny_model: Any, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, max_connections=1) as small:
        ws, _ = await open_session(small)
        other = await connect(small.realtime_url)
        with pytest.raises(ConnectionClosed) as info:
            await recv(other)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        await ws.close()


async def test_health_and_not_found(server: RunningServer) -> None:
    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
    status, body = await asyncio.to_thread(get, "/elsewhere")
    assert status == 404 and "/v1/realtime" in body


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return reply


@pytest.mark.parametrize("data", [
    b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the WebSocket route
    b"\x16\x03\x01\x02\x00garbage that is no HTTP at all\r\n\r\n",  # e.g. TLS to a plain port
    b"GET /v1/realtime HTTP/1.1\r\n",  # gives up half-way
])
async def test_failed_handshakes_are_one_log_line_and_name_no_versions(
        server: RunningServer, data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        reply = await raw_exchange(server.port, data)
        await asyncio.sleep(0.1)
    if reply:
        head = reply.split(b"\r\n\r\n")[0].decode().lower()
        assert "server: assistant" in head and "python" not in head and "websockets/" not in head
    logged = [r for r in caplog.records if r.name.startswith("websockets")]
    assert len(logged) <= 1 and not any(r.exc_info or r.levelno >= logging.WARNING for r in logged), caplog.text
    ws, _ = await open_session(server)  # still serving
    await ws.close()


async def test_tls_serves_wss(tiny_model: Any, data_dir: Path, tmp_path: Path) -> None:
    cert, key = make_self_signed_cert(tmp_path / "tls")
    async with running_server(tiny_model, data_dir, tls_certfile=cert, tls_keyfile=key) as tls_server:
        assert tls_server.realtime_url.startswith("wss://")
        ws, session = await open_session(tls_server, ssl=client_context(cert))
        await send(ws, user_item("Hello"))
        await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})
        done = (await recv_until(ws, "response.done"))[-1]
        assert done["response"]["status"] == "incomplete"
        await ws.close()
        with pytest.raises((InvalidMessage, ConnectionClosed)):  # plain ws:// to a TLS port gets nowhere
            await connect(f"ws://127.0.0.1:{tls_server.port}/v1/realtime", open_timeout=10)
        ws, _ = await open_session(tls_server, ssl=client_context(cert))
        await ws.close()


def test_tls_needs_both_files_and_readable_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_certfile and tls_keyfile"):
        load_config({"tls_certfile": "cert.pem"}, env={})
    with pytest.raises(RuntimeError, match="cannot use the TLS certificate"):
        tls_context(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))


async def test_engine_queue_full_fails_the_response_with_a_code(streaming_model: Any, data_dir: Path) -> None:
    async with running_server(streaming_model, data_dir, temperature=0, max_running_requests=1,
                              max_waiting_requests=1) as small:
        running, _ = await open_session(small)
        await start_long_response(running)
        waiting, _ = await open_session(small)
        await send(waiting, user_item("queued"))
        await recv_until(waiting, "conversation.item.done")
        await send(waiting, {"type": "response.create"})
        await recv_until(waiting, "response.content_part.added")
        refused, _ = await open_session(small)
        await send(refused, user_item("one too many"))
        await recv_until(refused, "conversation.item.done")
        await send(refused, {"type": "response.create"})
        response = (await recv_until(refused, "response.done"))[-1]["response"]
        assert response["status"] == "failed"
        assert response["status_details"]["error"]["code"] == "server_overloaded"
        for ws in (running, waiting):
            await send(ws, {"type": "response.cancel"})
            assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "cancelled"
        # The refused connection still works once there is room.
        await send(refused, {"type": "response.create", "response": {"max_output_tokens": 2}})
        assert (await recv_until(refused, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
        for ws in (running, waiting, refused):
            await ws.close()


async def test_out_of_band_response_with_its_own_input(server: RunningServer) -> None:
    ws, session = await open_session(server)
    await send(ws, user_item("stored turn"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {
        "conversation": "none", "max_output_tokens": 3, "metadata": {"purpose": "title"},
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Title?"}]}]}})
    events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "conversation.item.added" not in kinds and "conversation.item.done" not in kinds
    response = events[-1]["response"]
    assert response["metadata"] == {"purpose": "title"} and response["output"]
    assert [i.text for i in server.app.store.list_items(session["conversation_id"])] == ["stored turn"]
    await ws.close()


async def test_cancel_right_after_create_is_not_lost(server: RunningServer) -> None:
    """A cancel that arrives while the prompt is still being prepared stops the response all the same."""
    ws, _ = await open_session(server)
    await send(ws, user_item("Tell me a very long story"))
    await recv_until(ws, "conversation.item.done")
    await ws.send(json.dumps({"type": "response.create", "response": {"temperature": 1.0}}))
    await ws.send(json.dumps({"type": "response.cancel"}))
    response = (await recv_until(ws, "response.done"))[-1]["response"]
    assert response["status"] == "cancelled" and response["usage"]["output_tokens"] < 1000
    stored = server.app.store.get_response(response["id"])
    assert stored is not None and stored.status == "cancelled"
    await ws.close()


async def test_deleting_the_output_item_mid_response_still_records_the_response(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, user_item("Hello"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 20}})
    added = (await recv_until(ws, "conversation.item.added"))[-1]
    await send(ws, {"type": "conversation.item.delete", "item_id": added["item"]["id"]})
    response = (await recv_until(ws, "response.done"))[-1]["response"]
    stored = server.app.store.get_response(response["id"])
    assert stored is not None and stored.status == response["status"] != "in_progress"
    assert stored.usage.output_tokens == response["usage"]["output_tokens"]
    await ws.close()


# ------------------------------------------------------------ what voice and agent front-ends send


async def test_audio_and_tools_fields_are_named_and_the_rest_applies(server: RunningServer) -> None:
    ws, session = await open_session(server)
    assert session["max_output_tokens"] == 1024  # the default cap
    await send(ws, {"type": "session.update", "event_id": "s1", "session": {
        "type": "realtime", "instructions": "Be terse.", "max_output_tokens": 5, "output_modalities": ["audio"],
        "audio": {"output": {"voice": "ash"}, "input": {"turn_detection": {"type": "semantic_vad"}}},
        "tools": [{"type": "function", "name": "lookup_order", "parameters": {}}], "tool_choice": "auto"}})
    audio, updated = await recv(ws), await recv(ws)
    assert audio["error"]["code"] == "audio_not_supported" and audio["error"]["event_id"] == "s1"
    assert audio["error"]["param"] == "session.output_modalities"
    assert "session.audio.output.voice" in audio["error"]["message"]
    assert "session.audio.input.turn_detection" in audio["error"]["message"]
    s = updated["session"]
    assert updated["type"] == "session.updated"
    assert (s["instructions"], s["max_output_tokens"], s["output_modalities"], s["tool_choice"]) == (
        "Be terse.", 5, ["text"], "auto")
    assert [tool["name"] for tool in s["tools"]] == ["lookup_order"]  # tools are applied too
    await send(ws, user_item("Hello"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "event_id": "r1",
                    "response": {"output_modalities": ["audio"], "max_output_tokens": 2}})
    events = await recv_until(ws, "response.done")
    assert events[0]["type"] == "error" and events[0]["error"]["code"] == "audio_not_supported"
    assert events[-1]["response"]["status"] == "incomplete"  # the text response ran, with its own limit
    assert events[-1]["response"]["usage"]["output_tokens"] == 2
    await ws.close()


async def test_audio_buffer_clear_and_idle_cancel_get_official_answers(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, {"type": "input_audio_buffer.clear", "event_id": "c1"})
    assert (await recv(ws))["type"] == "input_audio_buffer.cleared"
    await send(ws, {"type": "response.cancel", "event_id": "c2"})
    error = (await recv(ws))["error"]
    assert (error["code"], error["event_id"]) == ("response_cancel_not_active", "c2")
    await ws.close()


async def test_session_model_echoes_the_model_asked_for(server: RunningServer) -> None:
    ws, session = await open_session(server, "?model=gpt-realtime")
    assert session["model"] == "gpt-realtime"
    await ws.close()
    ws, session = await open_session(server)
    assert session["model"] == server.app.model_name
    await ws.close()


async def test_out_of_band_response_has_no_conversation_id(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, {"type": "response.create", "response": {"conversation": "none", "max_output_tokens": 2, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}})
    events = await recv_until(ws, "response.done")
    assert events[0]["response"]["conversation_id"] is None and events[-1]["response"]["conversation_id"] is None
    await ws.close()


async def test_unechoable_event_id_and_huge_numbers_keep_the_connection(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await ws.send('{"type": "session.update", "event_id": "\\ud800", "session": {}}')
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "event_id", None)
    await ws.send('{"type": "session.update", "session": {"top_p": 1%s}}' % ("0" * 400))
    assert (await recv(ws))["error"]["code"] == "invalid_value"
    await send(ws, {"type": "session.update", "session": {"temperature": 0}})
    assert (await recv(ws))["type"] == "session.updated"
    await ws.close()
