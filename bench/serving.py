"""An in-process server for the benches, built exactly as ``assistant serve`` builds it."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def serving(label: str, **flags: str) -> AsyncIterator[str]:
    """The Realtime URL of a server built from the config ``flags`` (``model``, ``quantize``...) on a
    throw-away SQLite store and an ephemeral port; prints how long the model took to load."""
    from assistant.app import build_app, close_app
    from assistant.cli import configure_logging
    from assistant.config import load_config
    from assistant.server import start_server, url_of

    configure_logging("warning")  # as quiet as `assistant serve`: no loading bars or library notes between figures
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config({**flags, "database_url": f"sqlite:///{Path(tmp) / 'bench.db'}"}, env={})
        started = time.perf_counter()
        app = await asyncio.to_thread(build_app, config, lambda _: None)
        print(f"{label}, loaded in {time.perf_counter() - started:.1f} s", flush=True)
        server = await start_server(app, "127.0.0.1", 0)
        try:
            yield url_of(app, "127.0.0.1", server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()
            close_app(app)


async def run_response(ws: Any, response: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Send ``response.create`` with ``response`` on a Realtime connection; (the ``response`` of its
    ``response.done``, seconds it took). An error event or a failed response raises RuntimeError."""
    started = time.perf_counter()
    await ws.send(json.dumps({"type": "response.create", "response": response}))
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "error":
            raise RuntimeError(f"server error: {event['error']}")
        if event["type"] == "response.done":
            break
    done = event["response"]
    if done["status"] == "failed":
        raise RuntimeError(f"response failed: {done['status_details']}")
    return done, time.perf_counter() - started
