"""The WebSocket protocol's bounds over real loopback sockets: a client that stops reading is dropped, and the
server goes on serving the others. (Messages over the limit: tests/test_server.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from tests.conftest import running_server
from tests.engine_fixtures import save_tiny_chat_model
from tests.test_server import open_session, recv_until, user_item

SEND_TIMEOUT_S = 5
CONTEXT_TOKENS = 16384
# A forced call whose one argument is a string of at least MIN_NOTE_CHARS characters (one token each): a response
# that cannot end on its own for tens of seconds, where the tiny model writes 2048 tokens in under send_timeout.
MIN_NOTE_CHARS = 12_000
LONG_NOTE = {"type": "function", "name": "note", "description": "Write a note down.", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": MIN_NOTE_CHARS}}, "required": ["text"]}}


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    directory = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=CONTEXT_TOKENS)
    return load_chat_model(str(directory), dtype="float32")


def _client_frame(event: dict[str, Any]) -> bytes:
    return Frame(Opcode.TEXT, json.dumps(event).encode()).serialize(mask=True, extensions=[])


async def _open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client on a socket with a tiny receive buffer, without compression, that reads only when told."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: it sets the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_a_client_that_stops_reading_is_dropped_and_its_response_finished(long_context_model: ChatModel,
                                                                                data_dir: Path) -> None:
    async with running_server(long_context_model, data_dir, temperature=0, send_timeout=SEND_TIMEOUT_S) as running:
        reader, writer = await _open_raw(running.port)
        # A dropped connection's response would run on to its end for a reconnect (assistant.replay); this client
        # asks for it to be cancelled instead, so the test sees the response end as soon as the client is dropped.
        writer.write(_client_frame({"type": "session.update", "session": {"cancel_on_disconnect": True}}))
        writer.write(_client_frame({"type": "response.create", "response": {
            "conversation": "none", "input": [user_item("Take a long note.")["item"]], "tools": [LONG_NOTE],
            "tool_choice": "required", "max_output_tokens": "inf", "temperature": 1.0, "seed": 1}}))
        try:
            seen = b""
            while (match := re.search(rb'"response\.created".*?"id": "(resp_\w+)"', seen)) is None:
                seen += await asyncio.wait_for(reader.read(4096), 30)
            response_id = match.group(1).decode()
            # While the response streams, ask for ~12 MB of echoes (each item comes back twice) and read nothing more:
            # the socket buffers fill, and every send to this client waits.
            for _ in range(30):
                writer.write(_client_frame(user_item("z" * 200_000)))
            await asyncio.sleep(0.5)

            # The server goes on serving everyone else meanwhile.
            started = time.monotonic()
            ws, _ = await open_session(running)
            await ws.send(json.dumps(user_item("hello")))
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 8}}))
            done = (await recv_until(ws, "response.done"))[-1]
            assert done["response"]["status"] in ("completed", "incomplete")
            assert len(running.app.sockets) == 2, "the stuck client was dropped before the other one was served"
            await ws.close()

            # The stuck client is dropped once its sends have waited send_timeout, and its response ends as if it
            # had left: the engine stops generating for it, and the outcome is stored.
            while running.app.sockets:
                assert time.monotonic() - started < SEND_TIMEOUT_S + 30, "the stuck client was never dropped"
                await asyncio.sleep(0.1)
            stored = running.app.store.get_response(response_id)
            while stored is None or stored.status == "in_progress":
                assert time.monotonic() - started < SEND_TIMEOUT_S + 30, "the stuck client's response never ended"
                await asyncio.sleep(0.1)
                stored = running.app.store.get_response(response_id)
            assert stored.status == "cancelled" and stored.usage.output_tokens < MIN_NOTE_CHARS
        finally:
            writer.transport.abort()  # without the bound, the server would wait on this client forever
