"""The OpenAI Agents SDK (`openai-agents`) in text mode against a loopback server.

``RealtimeRunner`` speaks GA Realtime and validates every server event with the
``openai`` pydantic types; whatever fails validation reaches the application as an
``error`` event. Its ``session.update`` always carries audio settings (formats, voice,
transcription, turn detection), which this server answers with one coded
``audio_not_supported`` error while applying the rest; that must be the only error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents.realtime import RealtimeAgent, RealtimeRunner, RealtimeSession

from tests.conftest import RunningServer

TIMEOUT = 60


def server_event(event: Any) -> dict[str, Any] | None:
    """The raw server event inside a session event, if it is one."""
    if event.type == "raw_model_event" and event.data.type == "raw_server_event":
        return event.data.data  # type: ignore[no-any-return]
    return None


async def events_until(session: RealtimeSession, type_: str) -> list[Any]:
    """Session events up to and including the first of ``type_``."""
    events: list[Any] = []
    iterator = session.__aiter__()
    while True:
        events.append(await asyncio.wait_for(anext(iterator), TIMEOUT))
        if events[-1].type == type_:
            return events


async def test_agents_sdk_text_turn(server: RunningServer) -> None:
    agent = RealtimeAgent(name="Assistant", instructions="Answer in one short sentence.")
    runner = RealtimeRunner(agent, config={"model_settings": {"output_modalities": ["text"],
                                                               "max_output_tokens": 12}})
    async with await runner.run(model_config={"url": server.realtime_url, "api_key": "unused"}) as session:
        await session.send_message("Hello, who are you?")
        events = await events_until(session, "agent_end")

    raw = [e for e in map(server_event, events) if e is not None]
    kinds = [e["type"] for e in raw]
    assert kinds[0] == "session.created" and "session.updated" in kinds
    assert kinds[-1] == "response.done"
    deltas = [e.data.delta for e in events if e.type == "raw_model_event" and e.data.type == "output_text_delta"]
    assert deltas, raw[-1]
    errors = [e.error for e in events if e.type == "error"]
    assert len(errors) == 1 and errors[0].code == "audio_not_supported", errors
    assert errors[0].param.startswith("session.audio.")
    applied = next(e["session"] for e in raw if e["type"] == "session.updated")  # the rest of that update
    assert (applied["instructions"], applied["max_output_tokens"]) == ("Answer in one short sentence.", 12)

    # The text the client assembled is the text the server stored for this response.
    conversation_id = raw[0]["session"]["conversation_id"]
    done = raw[-1]["response"]
    assert done["status"] in ("completed", "incomplete")
    stored = [item for item in server.app.store.list_items(conversation_id) if item.id == done["output"][0]["id"]]
    assert len(stored) == 1 and stored[0].role == "assistant"
    assert "".join(deltas) == stored[0].text == done["output"][0]["content"][0]["text"]
    # The agent's own history holds the same reply.
    history = [e for e in events if e.type == "history_updated"][-1].history
    replies = [item for item in history if getattr(item, "role", None) == "assistant"]
    assert [part.text for part in replies[-1].content] == [stored[0].text]
