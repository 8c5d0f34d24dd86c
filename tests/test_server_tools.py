"""Function calling over the Realtime socket: tools in the session and per response, tool calls as output
items, results sent back as items; raw `websockets` clients and the `openai` SDK, with the tiny random model.

The random model writes garbage unless held to a grammar, so a call whose arguments parse and validate
against the tool's schema shows that the response was constrained.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
from websockets.asyncio.client import ClientConnection

from tests.conftest import RunningServer
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.test_server_sdk import client_for, collect

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": WEATHER_PARAMETERS}
NOTE = {"type": "function", "name": "note", "description": "Write a note down.", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
CALL_HEAD = ["response.created", "response.output_item.added", "conversation.item.added"]
CALL_TAIL = ["response.function_call_arguments.done", "response.output_item.done", "conversation.item.done"]


async def ask(ws: ClientConnection, text: str, **response: Any) -> list[dict[str, Any]]:
    """A user message, then a response: every event up to response.done."""
    await send(ws, user_item(text))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 300, **response}})
    return await recv_until(ws, "response.done")


def calls_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function_call items of a response, as response.done lists them."""
    return [item for item in events[-1]["response"]["output"] if item["type"] == "function_call"]


async def test_required_tool_choice_gives_a_valid_call_streamed_stored_and_retrievable(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    events = await ask(ws, "What is the weather in Paris?", tools=[WEATHER], tool_choice="required")
    kinds = [event["type"] for event in events]
    assert kinds[:3] == CALL_HEAD and kinds[-1] == "response.done"
    assert "response.output_text.delta" not in kinds and "response.content_part.added" not in kinds
    added = events[1]["item"]
    assert (added["type"], added["status"], added["name"], added["arguments"]) == (
        "function_call", "in_progress", "get_weather", "")
    assert added["call_id"].startswith("call_") and events[1]["output_index"] == 0
    # The first call's events, in order: its deltas, then its done events.
    first = [event for event in events if event.get("item_id") == added["id"] or
             event.get("item", {}).get("id") == added["id"]]
    first_kinds = [event["type"] for event in first]
    assert first_kinds[:2] == ["response.output_item.added", "conversation.item.added"]
    assert first_kinds[-3:] == CALL_TAIL
    assert set(first_kinds[2:-3]) == {"response.function_call_arguments.delta"}
    deltas = first[2:-3]
    assert all(delta["call_id"] == added["call_id"] and delta["output_index"] == 0 for delta in deltas)
    arguments_done = first[-3]
    arguments = "".join(delta["delta"] for delta in deltas)
    assert (arguments_done["arguments"], arguments_done["name"], arguments_done["call_id"]) == (
        arguments, "get_weather", added["call_id"])
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)  # the grammar held the random model
    done_item = first[-2]["item"]
    assert (done_item["status"], done_item["arguments"]) == ("completed", arguments)
    # Every call is an output item of response.done, at its output_index, and stored.
    calls = calls_of(events)
    assert calls and calls[0] == done_item
    added_indices = [event["output_index"] for event in events if event["type"] == "response.output_item.added"]
    assert added_indices == list(range(len(calls)))  # one output item per call, in order
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["function_call"] * len(calls)
    for call in calls:
        if call["status"] == "completed":
            jsonschema.validate(json.loads(call["arguments"]), WEATHER_PARAMETERS)
    await send(ws, {"type": "conversation.item.retrieve", "item_id": added["id"]})
    retrieved = (await recv(ws))["item"]
    assert retrieved == done_item
    stored = server.app.store.get_response(events[-1]["response"]["id"])
    assert stored is not None and stored.output_item_ids == tuple(call["id"] for call in calls)
    await ws.close()


async def test_a_call_and_its_output_then_the_conversation_goes_on(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, {"type": "session.update", "session": {"tools": [WEATHER], "tool_choice": {
        "type": "function", "name": "get_weather"}}})
    assert (await recv(ws))["type"] == "session.updated"
    events = await ask(ws, "Weather in Oslo?")
    [call] = calls_of(events)  # a named function: one call
    assert call["status"] == "completed" and events[-1]["response"]["status"] == "completed"
    await send(ws, {"type": "conversation.item.create", "event_id": "out", "item": {
        "type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 21}'}})
    added = await recv(ws)
    assert added["type"] == "conversation.item.added" and added["previous_item_id"] == call["id"]
    assert {key: added["item"][key] for key in ("type", "call_id", "output")} == {
        "type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 21}'}
    await recv(ws)  # conversation.item.done
    # The client lets the model answer in words now.
    await send(ws, {"type": "response.create", "response": {"tool_choice": "none", "max_output_tokens": 8}})
    answer = await recv_until(ws, "response.done")
    assert [item["type"] for item in answer[-1]["response"]["output"]] == ["message"]
    assert answer[-1]["response"]["status"] in ("completed", "incomplete")
    items = server.app.store.list_items(events[-1]["response"]["conversation_id"])
    assert [item.type for item in items] == ["message", "function_call", "function_call_output", "message"]
    # The session's tool choice is untouched by the response's own.
    await send(ws, {"type": "session.update", "session": {}})
    assert (await recv(ws))["session"]["tool_choice"] == {"type": "function", "name": "get_weather"}
    await ws.close()


async def test_session_update_echoes_tools_and_none_answers_in_text(server: RunningServer) -> None:
    ws, session = await open_session(server)
    assert (session["tools"], session["tool_choice"]) == ([], "auto")
    await send(ws, {"type": "session.update", "session": {"tools": [WEATHER], "tool_choice": "none"}})
    updated = (await recv(ws))["session"]
    assert updated["tools"] == [WEATHER] and updated["tool_choice"] == "none"
    events = await ask(ws, "Weather?", max_output_tokens=10)
    kinds = [event["type"] for event in events]
    assert "response.function_call_arguments.delta" not in kinds and "response.output_text.delta" in kinds
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message"]
    await ws.close()


async def test_a_tool_choice_that_fits_no_tool_is_coded_and_changes_nothing(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, {"type": "session.update", "event_id": "s1", "session": {
        "instructions": "Changed?", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}}})
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "session.tool_choice.name", "s1")
    await send(ws, {"type": "session.update", "event_id": "s2", "session": {"tool_choice": "required"}})
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "session.tool_choice")
    await send(ws, {"type": "session.update", "session": {}})
    session = (await recv(ws))["session"]
    assert (session["instructions"], session["tools"], session["tool_choice"]) != ("Changed?", [WEATHER], "auto")
    assert session["tools"] == [] and session["tool_choice"] == "auto"
    await send(ws, user_item("Hi"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "event_id": "r1", "response": {
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}}})
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "response.tool_choice.name", "r1")
    await send(ws, {"type": "response.create", "event_id": "r2", "response": {"tools": [{
        "type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "format": "no-such-format"}}}}]}})
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == (
        "unsupported_schema", "response.tools[0].parameters", "r2")
    # Nothing ran and nothing was stored: the conversation holds the one user message.
    items = server.app.store.list_items(session["conversation_id"])
    assert [(item.type, item.role) for item in items] == [("message", "user")]
    await ws.close()


async def test_bad_tool_items_are_coded_and_nothing_is_stored(server: RunningServer) -> None:
    ws, session = await open_session(server)
    bad = [({"type": "function_call_output", "output": "x"}, "missing_required_parameter", "item.call_id"),
           ({"type": "function_call_output", "call_id": "call_1", "output": {"t": 1}}, "invalid_type", "item.output"),
           ({"type": "function_call", "call_id": "call_1", "name": "f"}, "missing_required_parameter",
            "item.arguments")]
    for item, code, param in bad:
        await send(ws, {"type": "conversation.item.create", "event_id": "e", "item": item})
        error = (await recv(ws))["error"]
        assert (error["code"], error["param"], error["event_id"]) == (code, param, "e")
    assert server.app.store.list_items(session["conversation_id"]) == []
    await ws.close()


async def start_a_long_call(ws: Any) -> None:
    """A forced call of the note tool: a free string of up to 2000 tokens, which does not end on its own soon."""
    await send(ws, user_item("Take a long note."))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {
        "tools": [NOTE], "tool_choice": "required", "max_output_tokens": 2000, "temperature": 1.0, "seed": 1}})


async def test_a_cancelled_call_is_stored_incomplete(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await start_a_long_call(ws)
    await recv_until(ws, "response.function_call_arguments.delta")
    await send(ws, {"type": "response.cancel"})
    events = await recv_until(ws, "response.done")
    response = events[-1]["response"]
    assert response["status"] == "cancelled"  # a free string of up to 2000 tokens does not end first
    last = response["output"][-1]
    assert last["type"] == "function_call" and last["status"] == "incomplete"
    done = [event for event in events if event["type"] == "response.function_call_arguments.done"]
    assert done[-1]["item_id"] == last["id"] and done[-1]["arguments"] == last["arguments"]
    stored = server.app.store.get_item(response["conversation_id"], last["id"])
    assert (stored.status, stored.arguments) == ("incomplete", last["arguments"])
    await ws.close()


async def test_a_call_cut_by_a_disconnect_is_stored_incomplete(server: RunningServer) -> None:
    ws, session = await open_session(server)
    await send(ws, {"type": "session.update", "session": {"type": "realtime", "cancel_on_disconnect": True}})
    await recv_until(ws, "session.updated")
    await start_a_long_call(ws)
    response_id = (await recv(ws))["response"]["id"]
    call_id = (await recv(ws))["item"]["id"]
    await recv_until(ws, "response.function_call_arguments.delta")
    await ws.close()
    for _ in range(200):  # the server notices the close, cancels, and stores the outcome
        stored = server.app.store.get_response(response_id)
        if stored is not None and stored.status != "in_progress":
            break
        await asyncio.sleep(0.05)
    assert stored is not None and stored.status == "cancelled" and stored.output_item_ids == (call_id,)
    item = server.app.store.get_item(session["conversation_id"], call_id)
    assert item.type == "function_call" and item.status == "incomplete" and item.arguments


async def test_auto_answers_in_text_or_in_calls_never_both(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    events = await ask(ws, "Weather in Paris?", tools=[WEATHER], tool_choice="auto", max_output_tokens=40)
    kinds = {item["type"] for item in events[-1]["response"]["output"]}
    assert kinds in ({"message"}, {"function_call"})
    if kinds == {"message"}:  # announced when its text came, and streamed as text
        assert "response.function_call_arguments.delta" not in [event["type"] for event in events]
    await ws.close()


async def test_sdk_client_receives_calls_and_sends_results(server: RunningServer) -> None:
    async with client_for(server).realtime.connect(model="tiny") as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER],  # type: ignore[list-item]
                                           "tool_choice": "required", "max_output_tokens": 300})
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.tools[0].name == "get_weather"  # type: ignore[union-attr]
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Weather in Lima?"}]})
        await collect(conn, "conversation.item.done")
        await conn.response.create()
        events = await collect(conn, "response.done")
        registered = [e.item for e in events if e.type == "conversation.item.added"]
        arguments_done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert registered and registered[0].type == "function_call"
        assert arguments_done and arguments_done[0].call_id == registered[0].call_id  # type: ignore[union-attr]
        jsonschema.validate(json.loads(arguments_done[0].arguments), WEATHER_PARAMETERS)
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": arguments_done[0].call_id,
                                                  "output": "sunny, 25 degrees"})
        created = await collect(conn, "conversation.item.done")
        assert created[-1].item.type == "function_call_output"
        await conn.response.create(response={"tool_choice": "none", "max_output_tokens": 5})
        done = (await collect(conn, "response.done"))[-1].response
        assert done.output[0].type == "message" and done.status in ("completed", "incomplete")


async def test_beta_client_gets_function_call_events(server: RunningServer) -> None:
    async with client_for(server).beta.realtime.connect(model="tiny") as conn:
        await conn.recv()
        await conn.session.update(session={"tools": [WEATHER], "tool_choice": "required"})  # type: ignore[list-item]
        assert (await conn.recv()).type == "session.updated"
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Weather?"}]})
        await conn.response.create(response={"max_response_output_tokens": 300})
        events = await collect(conn, "response.done")
        kinds = [e.type for e in events]
        assert "conversation.item.created" in kinds and "conversation.item.done" not in kinds
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done and json.loads(done[0].arguments)["city"] in ("Paris", "Oslo", "Lima")
        assert events[-1].response.output[0].type == "function_call"
