"""The default model (as `assistant serve` loads it: nf4, with its vision part) behind the real server, driven
by the openai SDK, with the server's defaults."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server

pytestmark = pytest.mark.real_model


async def ask(server: RunningServer, question: str, **session: Any) -> tuple[str, Any]:
    """The README's first example: one question on a fresh connection; (streamed text, response.done's response)."""
    client = AsyncOpenAI(api_key="unused", base_url=server.http_base, websocket_base_url=server.ws_base)
    async with client.realtime.connect(model="assistant") as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], **session})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]})
        await conn.response.create()
        deltas = []
        while True:
            event = await asyncio.wait_for(conn.recv(), 300)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.done":
                assert len(deltas) > 1  # streamed, not sent in one piece
                return "".join(deltas), event.response


async def test_the_readme_example_answers_with_the_defaults(default_model: ChatModel, data_dir: Path) -> None:
    async with running_server(default_model, data_dir) as server:
        for seed in range(3):
            text, response = await ask(server, "What is the capital of Japan?", seed=seed)
            assert "Tokyo" in text and response.status == "completed", (seed, text)


async def test_nothing_runs_away_with_the_defaults(default_model: ChatModel, data_dir: Path) -> None:
    """The question that once streamed "la Révolution, la Révolution, ..." until the context was full:
    with the default sampling and penalties each answer now ends by itself, short."""
    async with running_server(default_model, data_dir) as server:
        for seed in range(4):
            text, response = await ask(server, "What is the capital of France?", seed=seed)
            assert response.status == "completed" and response.usage.output_tokens < 200, (seed, text)
