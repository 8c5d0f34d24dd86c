"""Every server event, GA and beta, against the `openai` SDK's own pydantic types.

The SDK's Realtime clients parse server events without validation, but clients built on
its types validate them (the Agents SDK runs every event through a ``TypeAdapter`` of
``RealtimeServerEvent`` and drops what fails). So each event a raw ``websockets`` client
receives here is validated the strict way:

- from the frame's JSON with ``strict=True``, so a wrong type is not coerced ("0" for 0);
- through the union discriminated on ``type``, and the result must be the event's own
  model class; nested unions (the session, items) must land on their own class too;
- every field the SDK types do not declare must be one of our documented additive
  extensions (``GA_EXTENSIONS``, ``BETA_EXTENSIONS``); a misspelt or other-dialect field would otherwise pass as
  an "extra" (the SDK models allow extra fields).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args

import pydantic
import pytest
from openai.types.beta.realtime import realtime_server_event as beta_types
from openai.types.beta.realtime.session import Session as BetaSession
from openai.types.realtime import realtime_server_event as ga_types
from openai.types.realtime.realtime_conversation_item_assistant_message import RealtimeConversationItemAssistantMessage
from openai.types.realtime.realtime_conversation_item_function_call import RealtimeConversationItemFunctionCall
from openai.types.realtime.realtime_conversation_item_function_call_output import (
    RealtimeConversationItemFunctionCallOutput)
from openai.types.realtime.realtime_conversation_item_user_message import RealtimeConversationItemUserMessage
from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest
from pydantic import BaseModel, Field, TypeAdapter
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer
from tests.test_server import TIMEOUT, user_item
from tests.test_server_images import data_url, image_item, vision_model, vision_server  # noqa: F401 (fixtures)
from tests.vision_fixtures import make_image

# Our additive extensions, as paths of fields the SDK types leave undeclared ("content[]" is
# any item's content part). A path matches when it equals one of these or ends in ".<one>".
COMMON_EXTENSIONS = frozenset({
    "session.conversation_id", "session.seed", "session.stop", "session.top_p", "session.frequency_penalty",
    "session.presence_penalty", "session.repetition_penalty", "session.cancel_on_disconnect",
    # What OpenAI's own server sends but the SDK's session types do not declare:
    "session.id", "session.object",
    # A failed response says why in words (declared in openai 3.57's types, not yet in 2.45's):
    "status_details.error.message",
})
GA_EXTENSIONS = COMMON_EXTENSIONS | {"session.temperature", "content[].image_sha256"}
# Beta content parts have no image type at all, so only GA is checked with images.
BETA_EXTENSIONS = COMMON_EXTENSIONS | {"input_token_details.image_tokens", "input_token_details.cached_tokens_details"}


@dataclass(frozen=True)
class Dialect:
    name: str
    headers: dict[str, str]
    classes: dict[str, type[BaseModel]]  # event type -> its SDK model class
    adapter: TypeAdapter[Any]
    extensions: frozenset[str]
    session_class: type[BaseModel]

    def name_of(self, ga_name: str) -> str:
        if self.name == "ga":
            return ga_name
        return {"conversation.item.added": "conversation.item.created",
                "response.output_text.delta": "response.text.delta",
                "response.output_text.done": "response.text.done"}.get(ga_name, ga_name)


def make_dialect(name: str, union: Any, headers: dict[str, str], extensions: frozenset[str],
                 session_class: type[BaseModel]) -> Dialect:
    members = get_args(get_args(union)[0])  # Annotated[Union[...], PropertyInfo(discriminator="type")]
    classes = {get_args(m.model_fields["type"].annotation)[0]: m for m in members}
    assert len(classes) == len(members), "event types must be unique in the SDK union"
    # The SDK's PropertyInfo is not pydantic metadata: discriminate the way the Agents SDK does.
    adapter = TypeAdapter(Annotated[Union[tuple(members)], Field(discriminator="type")])  # type: ignore[valid-type]
    return Dialect(name, headers, classes, adapter, frozenset(extensions), session_class)


GA = make_dialect("ga", ga_types.RealtimeServerEvent, {}, GA_EXTENSIONS, RealtimeSessionCreateRequest)
BETA = make_dialect("beta", beta_types.RealtimeServerEvent, {"OpenAI-Beta": "realtime=v1"}, BETA_EXTENSIONS,
                    BetaSession)
# GA items are a union of one class per message role and per other item type.
ITEM_CLASSES = {"user": RealtimeConversationItemUserMessage, "assistant": RealtimeConversationItemAssistantMessage,
                "function_call": RealtimeConversationItemFunctionCall,
                "function_call_output": RealtimeConversationItemFunctionCallOutput}


def undeclared_fields(value: Any, path: str = "") -> Iterator[str]:
    """Paths of the fields that validated only as extras (list indices written as [])."""
    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            yield f"{path}.{key}".lstrip(".")
        for name in type(value).model_fields:
            yield from undeclared_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for element in value:
            yield from undeclared_fields(element, f"{path}[]")


def items_of(event: BaseModel) -> Iterator[BaseModel]:
    item = getattr(event, "item", None)
    if isinstance(item, BaseModel):
        yield item
    response = getattr(event, "response", None)
    yield from getattr(response, "output", None) or []


def validate(dialect: Dialect, frame: str | bytes) -> BaseModel:
    """The event as the SDK types read it; fails on anything a validating client would trip over."""
    kind = json.loads(frame)["type"]
    assert kind in dialect.classes, f"{kind!r} is not a {dialect.name} server event"
    try:
        event = dialect.adapter.validate_json(frame, strict=True)
    except pydantic.ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'][1:]))}: {e['msg']} (got {e['input']!r})"
                             for e in exc.errors(include_url=False))
        raise AssertionError(f"{dialect.name} {kind} does not conform:\n{problems}\n{frame!r}") from None
    assert type(event) is dialect.classes[kind]
    session = getattr(event, "session", None)
    if session is not None:
        assert type(session) is dialect.session_class, f"{kind}: the session validated as {type(session)}"
    if dialect is GA:
        for item in items_of(event):
            key = item.role if item.type == "message" else item.type  # type: ignore[attr-defined]
            assert type(item) is ITEM_CLASSES[key], f"{kind}: a {key} item validated as {type(item)}"
    unknown = [path for path in undeclared_fields(event)
               if not any(path == ext or path.endswith(f".{ext}") for ext in dialect.extensions)]
    assert not unknown, f"{dialect.name} {kind}: fields the SDK types do not declare: {unknown}\n{frame!r}"
    return event


class Client:
    """A raw websockets client that validates every event it receives."""

    def __init__(self, ws: ClientConnection, dialect: Dialect) -> None:
        self.ws, self.dialect = ws, dialect

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def recv(self) -> Any:
        return validate(self.dialect, await asyncio.wait_for(self.ws.recv(), TIMEOUT))

    async def recv_until(self, ga_name: str) -> list[Any]:
        """Every event up to and including the first of ``ga_name`` (named in this dialect)."""
        kind, events = self.dialect.name_of(ga_name), []
        while True:
            events.append(await self.recv())
            if events[-1].type == kind:
                return events


@pytest.fixture(params=[GA, BETA], ids=lambda d: d.name)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return request.param


@pytest.fixture
async def client(server: RunningServer, dialect: Dialect) -> Any:
    async with connect(server.realtime_url, additional_headers=dialect.headers) as ws:
        client = Client(ws, dialect)
        created = await client.recv()
        assert created.type == "session.created"
        yield client


# ------------------------------------------------------------------ the check itself


def test_the_check_refuses_what_a_validating_client_would_trip_over() -> None:
    delta = {"type": "response.output_text.delta", "event_id": "e", "response_id": "r", "item_id": "i",
             "output_index": 0, "content_index": 0, "delta": "x"}
    validate(GA, json.dumps(delta))
    for broken in ({k: v for k, v in delta.items() if k != "item_id"},  # a required field missing
                   {**delta, "output_index": "0"},  # lax pydantic would coerce this
                   {**delta, "delta": None}):
        with pytest.raises(AssertionError, match="does not conform"):
            validate(GA, json.dumps(broken))
    session = {"type": "session.updated", "event_id": "e", "session": {"type": "realtime", "instructions": "x"}}
    validate(GA, json.dumps(session))
    with pytest.raises(AssertionError, match="do not declare"):  # a beta field in a GA session
        validate(GA, json.dumps({**session, "session": {**session["session"], "modalities": ["text"]}}))
    with pytest.raises(AssertionError, match="does not conform"):
        validate(BETA, json.dumps({**session, "session": {"model": "not-an-openai-model"}}))


# ------------------------------------------------------------------ over the wire


async def test_a_full_turn(client: Client) -> None:
    await client.send({"type": "session.update", "session": {
        **({"type": "realtime"} if client.dialect is GA else {}), "instructions": "Be brief.", "temperature": 0,
        "max_output_tokens": 6}})
    updated = await client.recv()
    assert updated.type == "session.updated" and updated.session.instructions == "Be brief."
    await client.send(user_item("Hello there", event_id="c1"))
    added = await client.recv_until("conversation.item.added")
    assert added[-1].item.content[0].text == "Hello there"
    if client.dialect is GA:
        assert (await client.recv()).type == "conversation.item.done"
    await client.send({"type": "response.create"})
    events = await client.recv_until("response.done")
    name = client.dialect.name_of
    expected = ["response.created", "response.output_item.added", name("conversation.item.added"),
                "response.content_part.added"]
    assert [e.type for e in events[:4]] == expected
    deltas = [e.delta for e in events if e.type == name("response.output_text.delta")]
    tail = [name("response.output_text.done"), "response.content_part.done", "response.output_item.done",
            *(["conversation.item.done"] if client.dialect is GA else []), "response.done"]
    assert [e.type for e in events[-len(tail):]] == tail
    done = events[-1].response
    assert done.status in ("completed", "incomplete") and done.output[0].content[0].text == "".join(deltas)
    usage = done.usage
    assert usage.output_tokens <= 6 and usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_items_retrieved_and_deleted(client: Client) -> None:
    await client.send({"type": "conversation.item.create", "item": {
        "id": "item_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "keep me"}]}})
    await client.recv_until("conversation.item.added")
    if client.dialect is GA:
        await client.recv()
    await client.send({"type": "conversation.item.retrieve", "item_id": "item_1"})
    retrieved = await client.recv()
    assert retrieved.type == "conversation.item.retrieved" and retrieved.item.content[0].text == "keep me"
    await client.send({"type": "conversation.item.delete", "item_id": "item_1"})
    deleted = await client.recv()
    assert (deleted.type, deleted.item_id) == ("conversation.item.deleted", "item_1")


async def test_errors_refusals_and_the_audio_buffer(client: Client) -> None:
    await client.send({"type": "conversation.item.retrieve", "item_id": "item_missing", "event_id": "r1"})
    error = (await client.recv()).error
    assert (error.code, error.event_id, error.param) == ("item_not_found", "r1", "item_id")
    await client.send({"type": "response.cancel", "event_id": "c1"})
    assert (await client.recv()).error.code == "response_cancel_not_active"
    await client.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
    assert (await client.recv()).error.code == "audio_not_supported"
    await client.send({"type": "input_audio_buffer.clear"})
    assert (await client.recv()).type == "input_audio_buffer.cleared"
    audio = ({"audio": {"output": {"voice": "ash"}}} if client.dialect is GA else {"voice": "ash"})
    await client.send({"type": "session.update", "event_id": "s1", "session": {**audio, "instructions": "Hi."}})
    refused, updated = await client.recv(), await client.recv()
    assert (refused.error.code, refused.error.event_id) == ("audio_not_supported", "s1")
    assert updated.type == "session.updated" and updated.session.instructions == "Hi."
    await client.send({"type": "no.such.event"})
    assert (await client.recv()).error.code == "unknown_event_type"


async def test_a_cancelled_response(client: Client) -> None:
    await client.send(user_item("Go on forever"))
    await client.recv_until("conversation.item.added")
    # Greedy: the tiny model's EOS never wins a greedy pick, so this runs until cancelled.
    await client.send({"type": "response.create", "response": {"temperature": 0, "max_output_tokens": "inf"}})
    await client.recv_until("response.output_text.delta")
    await client.send({"type": "response.cancel"})
    done = (await client.recv_until("response.done"))[-1].response
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    assert done.status_details.type == "cancelled"


async def test_an_out_of_band_response_and_a_failed_one(client: Client) -> None:
    def out_of_band(text: str) -> dict[str, Any]:
        return {"type": "response.create", "response": {
            "conversation": "none", "max_output_tokens": 3, "metadata": {"purpose": "title"},
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}}

    await client.send(out_of_band("Title?"))
    events = await client.recv_until("response.done")
    assert not any(e.type == client.dialect.name_of("conversation.item.added") for e in events)
    done = events[-1].response
    assert done.conversation_id is None and done.metadata == {"purpose": "title"}
    await client.send(out_of_band("word " * 5000))  # beyond the tiny model's 2048-token context
    failed = (await client.recv_until("response.done"))[-1].response
    assert failed.status == "failed" and failed.status_details.error.code == "context_length_exceeded"


async def test_a_tool_call_and_its_output(client: Client) -> None:
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}
    await client.send({"type": "session.update", "session": {
        **({"type": "realtime"} if client.dialect is GA else {}), "tools": [weather], "tool_choice": "required"}})
    updated = await client.recv()
    assert updated.session.tools[0].name == "get_weather" and updated.session.tool_choice == "required"
    await client.send(user_item("Weather?"))
    await client.recv_until("conversation.item.added")
    if client.dialect is GA:
        await client.recv()
    await client.send({"type": "response.create", "response": {"max_output_tokens": 200}})
    events = await client.recv_until("response.done")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and json.loads(done[0].arguments)["city"] in ("Paris", "Oslo")
    call = events[-1].response.output[0]
    assert (call.type, call.name, call.call_id, call.arguments) == (
        "function_call", "get_weather", done[0].call_id, done[0].arguments)
    await client.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": call.call_id, "output": "sunny"}})
    added = (await client.recv_until("conversation.item.added"))[-1].item
    assert (added.type, added.call_id, added.output) == ("function_call_output", call.call_id, "sunny")


async def test_image_parts_in_ga(vision_server: RunningServer) -> None:  # noqa: F811 (the fixture)
    url = data_url(make_image(3))
    async with connect(vision_server.realtime_url) as ws:
        client = Client(ws, GA)
        await client.recv()
        await client.send(image_item(url, detail="low"))
        added = (await client.recv_until("conversation.item.added"))[-1].item
        image = added.content[1]
        assert (image.type, image.detail, image.image_url) == ("input_image", "low", None)  # no echo of the bytes
        assert len(image.model_extra["image_sha256"]) == 64
        await client.recv_until("conversation.item.done")
        await client.send({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = (await client.recv_until("response.done"))[-1].response
        assert done.usage.input_token_details.image_tokens > 0
        await client.send({"type": "conversation.item.retrieve", "item_id": added.id})
        assert (await client.recv()).item.content[1].image_url == url
