"""The real default model behind the real server, driven by the openai SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from assistant.engine.model import ChatModel
from tests.conftest import running_server

pytestmark = pytest.mark.real_model


async def test_capital_of_france_streams_paris(real_model: ChatModel, data_dir: Path) -> None:
    async with running_server(real_model, data_dir) as server:
        client = AsyncOpenAI(api_key="sk-unused", base_url=server.http_base, websocket_base_url=server.ws_base)
        async with client.realtime.connect(model="smollm2-135m-instruct") as conn:
            await conn.recv()
            await conn.session.update(session={"type": "realtime", "temperature": 0,  # type: ignore[typeddict-unknown-key]
                                               "max_output_tokens": 40})
            await conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "What is the capital of France?"}]})
            await conn.response.create()
            deltas = []
            while True:
                event = await asyncio.wait_for(conn.recv(), 120)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.done":
                    break
    assert "Paris" in "".join(deltas)
    assert event.response.status in ("completed", "incomplete")
    assert len(deltas) > 1  # streamed, not sent in one piece
