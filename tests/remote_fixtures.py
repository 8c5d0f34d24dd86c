"""A scripted OpenAI-compatible model server on loopback, for the remote engine's tests.

Each ``POST /v1/chat/completions`` takes the next :class:`Answer` of the script (the last one repeats):
an HTTP status, or server-sent chunks with a pause before each. The server records every request body
and notices when a client leaves mid-stream (``num_disconnects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Answer:
    chunks: list[dict[str, Any] | str] = field(default_factory=list)  # a str is sent as the data line as is
    status: int = 200
    error: dict[str, Any] | None = None  # the body of a non-200 answer
    delay: float = 0.0  # before each chunk
    done: bool = True  # end with data: [DONE]


def text_answer(*pieces: str, usage: dict[str, int] | None = None, finish_reason: str = "stop",
                delay: float = 0.0) -> Answer:
    chunks: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    chunks.append(chunk({}, finish_reason))
    if usage is not None:
        chunks.append({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
    return Answer(chunks, delay=delay)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


@dataclass
class FakeUpstream:
    script: list[Answer] = field(default_factory=lambda: [text_answer("Hello", " there", ".")])
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    num_disconnects: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            answer = self.script[min(len(self.bodies) - 1, len(self.script) - 1)]
            if answer.status != 200:
                return JSONResponse(answer.error or {"error": {"message": "no"}}, status_code=answer.status)

            async def events() -> AsyncIterator[str]:
                try:
                    for item in answer.chunks:
                        await asyncio.sleep(answer.delay)
                        yield f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"
                    if answer.done:
                        yield "data: [DONE]\n\n"
                except asyncio.CancelledError:  # Starlette cancels the body when the client disconnects
                    self.num_disconnects += 1
                    raise

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions,
                                                                      methods=["POST"])])


@contextlib.asynccontextmanager
async def running_upstream(upstream: FakeUpstream) -> AsyncIterator[FakeUpstream]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    upstream.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(upstream.app(), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield upstream
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()

