"""Replicas that cooperate through PostgreSQL's LISTEN/NOTIFY: two servers on one database, a response running
on one, followed and cancelled from the other (what a client reconnecting through a proxy to the other
replica does)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from assistant.engine.model import ChatModel
from assistant.peers import MAX_PART_CHARS
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.test_store import _postgres_schema_url

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_schema_url()


@pytest.fixture
async def replicas(streaming_model: ChatModel, tmp_path: Path,
                   postgres_url: str) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers on one PostgreSQL database, each with its own model and owner id; greedy, never ending."""
    options = {"database_url": postgres_url, "temperature": 0, "frequency_penalty": 0}
    async with running_server(streaming_model, tmp_path / "a", **options) as first, \
            running_server(streaming_model, tmp_path / "b", **options) as second:
        assert first.app.peers is not None and second.app.peers is not None
        yield first, second


async def start_long_response(server: RunningServer, max_output_tokens: int) -> tuple[str, list[dict]]:
    """A response started on ``server`` by a client that then drops; the conversation and what it got."""
    ws, session = await open_session(server)
    await send(ws, user_item("Tell me everything."))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": max_output_tokens}})
    seen = await recv_until(ws, "response.output_text.delta")
    for _ in range(5):
        seen.append(await recv(ws))
    await ws.close()
    return session["conversation_id"], seen


async def test_a_client_resuming_on_the_other_replica_follows_the_response_there(
        replicas: tuple[RunningServer, RunningServer]) -> None:
    first, second = replicas
    conversation, seen = await start_long_response(first, 1500)
    ws, _ = await open_session(second, f"?conversation={conversation}&last_event_id={seen[-1]['event_id']}")
    rest = await recv_until(ws, "response.done")
    events = seen + rest
    ids = [event["event_id"] for event in events]
    assert len(ids) == len(set(ids))  # no duplicate
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    done = rest[-1]["response"]
    assert done["usage"]["output_tokens"] == 1500 and done["output"][0]["content"][0]["text"] == text  # no gap
    # response.done (with the whole text) is bigger than one notification: it came in parts.
    assert len(json.dumps(rest[-1], ensure_ascii=True)) > MAX_PART_CHARS
    # A response.create there while it ran would have been refused; now it is over, one starts.
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "incomplete"
    await ws.close()


async def test_cancel_and_response_create_reach_the_replica_that_runs_it(
        replicas: tuple[RunningServer, RunningServer]) -> None:
    first, second = replicas
    conversation, _ = await start_long_response(first, 100_000)
    ws, _ = await open_session(second, f"?conversation={conversation}")
    await send(ws, {"type": "response.create", "event_id": "again"})
    error = (await recv_until(ws, "error"))[-1]["error"]
    assert (error["code"], error["event_id"]) == ("conversation_already_has_active_response", "again")
    await send(ws, {"type": "response.cancel"})
    live = first.app.live.get(conversation)
    assert live is not None and live.task is not None
    await asyncio.wait_for(asyncio.shield(live.task), 30)  # the first replica cancels it at its next step
    assert await asyncio.to_thread(second.app.store.running_elsewhere, conversation) is None
    response = first.app.store.get_response(live.response_id)
    assert response is not None and response.status == "cancelled"
    await ws.close()


async def test_a_stale_event_id_on_the_other_replica_gets_its_code(
        replicas: tuple[RunningServer, RunningServer]) -> None:
    first, second = replicas
    conversation, _ = await start_long_response(first, 100_000)
    ws, _ = await open_session(second, f"?conversation={conversation}&last_event_id=event_never_sent")
    error = (await recv_until(ws, "error"))[-1]["error"]
    assert (error["code"], error["param"]) == ("replay_unavailable", "last_event_id")
    # The live events follow.
    assert (await recv(ws))["type"].startswith("response.")
    await send(ws, {"type": "response.cancel"})
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "cancelled"
    await ws.close()
