"""Streaming text reaches the store while it streams: on a timer, so a stall in the tokens still saves what came
before it, with one save in flight at a time, and never after the item's final state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from assistant.engine.request import Finished, GenerationRequest, TokenDelta
from assistant.engine.sampling import SamplingParams
from assistant.events import Dialect, EventWriter
from assistant.flusher import FLUSH_INTERVAL_S, Flusher
from assistant.pending_writes import PendingWrites
from assistant.response_run import ResponseRun
from assistant.store import Store


class StallingEngine:
    """Streams two pieces, then stalls until aborted or released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        yield TokenDelta("Hello, ", 2)
        yield TokenDelta("world", 1)
        await self.release.wait()
        yield Finished(reason="stop", num_output_tokens=3)

    def abort(self, request_id: str) -> None:
        self.release.set()


async def test_text_before_a_stall_is_saved_while_the_stall_lasts(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/assistant.db")
    store.upgrade()
    conversation = store.create_conversation()
    engine = StallingEngine()
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    run = ResponseRun("resp_1", store=store, pending=PendingWrites(), engine=engine,
                      writer=EventWriter(Dialect.GA), send=send, conversation_id=conversation, in_conversation=True,
                      calls_tools=False)
    store.start_response("resp_1", conversation)
    task = asyncio.create_task(run.run(GenerationRequest("resp_1", (), SamplingParams())))
    try:
        await asyncio.sleep(2 * FLUSH_INTERVAL_S + 0.3)  # no token comes meanwhile
        [item] = store.list_items(conversation)
        assert (item.status, item.text) == ("in_progress", "Hello, world")
    finally:
        engine.release.set()
        await task
    [item] = store.list_items(conversation)
    assert (item.status, item.text) == ("completed", "Hello, world")
    record = store.get_response("resp_1")
    assert record is not None and record.status == "completed"
    store.close()


async def test_stop_waits_for_the_save_in_flight_and_saves_no_more() -> None:
    calls: list[str] = []

    async def slow_save() -> None:
        calls.append("start")
        await asyncio.sleep(0.2)
        calls.append("end")

    flusher = Flusher(slow_save, interval_s=0.05)
    flusher.start()
    while not calls:
        await asyncio.sleep(0.01)
    await flusher.stop()
    assert calls == ["start", "end"]  # one at a time, and the one in flight ended before stop returned
    await asyncio.sleep(0.2)
    assert calls == ["start", "end"]
