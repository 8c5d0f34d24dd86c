"""Server-event serialization in both dialects."""

from __future__ import annotations

from assistant.engine.sampling import SamplingParams
from assistant.events import Dialect, EventWriter, SessionView
from assistant.errors import ItemNotFound
from assistant.items import ContentPart, Item, Usage
from assistant.tools import FunctionTool, ToolChoice

VIEW = SessionView("sess_1", "m", "conv_1", "Be brief.", SamplingParams())


def test_event_ids_are_unique_and_beta_renames() -> None:
    ga, beta = EventWriter(Dialect.GA), EventWriter(Dialect.BETA)
    a, b = ga.event("response.output_text.delta", delta="x"), ga.event("response.output_text.delta", delta="x")
    assert a and b and a["event_id"] != b["event_id"]
    assert beta.event("response.output_text.delta")["type"] == "response.text.delta"  # type: ignore[index]
    assert beta.event("conversation.item.added")["type"] == "conversation.item.created"  # type: ignore[index]
    assert beta.event("conversation.item.done") is None
    done = {"item_id": "i", "call_id": "c", "name": "f", "arguments": "{}"}
    assert "name" not in beta.event("response.function_call_arguments.done", **done)  # type: ignore[operator]
    assert ga.event("response.function_call_arguments.done", **done)["name"] == "f"  # type: ignore[index]


def test_session_shapes() -> None:
    ga = EventWriter(Dialect.GA).session(VIEW)
    assert ga["type"] == "realtime" and ga["output_modalities"] == ["text"] and ga["max_output_tokens"] == "inf"
    assert ga["conversation_id"] == "conv_1"
    beta = EventWriter(Dialect.BETA).session(VIEW)
    assert beta["modalities"] == ["text"] and beta["max_response_output_tokens"] == "inf" and "type" not in beta


def test_items_and_images() -> None:
    item = Item("item_1", "user", (ContentPart("input_text", text="hi"),
                                   ContentPart("input_image", image_sha256="ab", detail="low")))
    wire = EventWriter(Dialect.GA).item(item)
    assert wire["content"][1] == {"type": "input_image", "detail": "low", "image_sha256": "ab"}
    full = EventWriter(Dialect.GA).item(item, {"ab": "data:image/png;base64,AA"}.__getitem__)
    assert full["content"][1]["image_url"] == "data:image/png;base64,AA"
    reply = Item("item_2", "assistant", (ContentPart("output_text", text="yo"),))
    assert EventWriter(Dialect.BETA).item(reply)["content"] == [{"type": "text", "text": "yo"}]
    assert EventWriter(Dialect.GA).item(reply)["content"] == [{"type": "output_text", "text": "yo"}]


def test_session_echoes_tools_and_tool_choice() -> None:
    weather = FunctionTool("get_weather", "The weather.", {"type": "object", "properties": {}})
    view = SessionView("sess_1", "m", "conv_1", "", SamplingParams(), (weather,), ToolChoice("function", "get_weather"))
    for dialect in Dialect:
        session = EventWriter(dialect).session(view)
        assert session["tools"] == [{"type": "function", "name": "get_weather", "description": "The weather.",
                                     "parameters": {"type": "object", "properties": {}}}]
        assert session["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert EventWriter(Dialect.GA).session(VIEW)["tool_choice"] == "auto"
    assert EventWriter(Dialect.GA).session(VIEW)["tools"] == []


def test_function_call_items_in_both_dialects() -> None:
    call = Item("item_3", "assistant", status="in_progress", type="function_call", call_id="call_1",
                name="get_weather", arguments='{"city": "Paris"}')
    result = Item("item_4", "user", type="function_call_output", call_id="call_1", output="sunny")
    for dialect in Dialect:
        writer = EventWriter(dialect)
        assert writer.item(call) == {"id": "item_3", "object": "realtime.item", "type": "function_call",
                                     "status": "in_progress", "call_id": "call_1", "name": "get_weather",
                                     "arguments": '{"city": "Paris"}'}
        assert writer.item(result) == {"id": "item_4", "object": "realtime.item", "type": "function_call_output",
                                       "call_id": "call_1", "output": "sunny"}


def test_response_usage_and_error() -> None:
    usage = Usage(input_tokens=100, output_tokens=5, cached_tokens=49, image_tokens=49, cached_image_tokens=49)
    body = EventWriter(Dialect.GA).response("resp_1", "conv_1", "completed", usage=usage)
    details = body["usage"]["input_token_details"]
    assert body["usage"]["total_tokens"] == 105
    assert details["image_tokens"] == 49 and details["text_tokens"] == 51 and details["cached_tokens"] == 49
    error = ItemNotFound("no such item", param="item_id")
    error.event_id = "e1"
    event = EventWriter(Dialect.GA).error(error)
    assert event["error"] == {"type": "invalid_request_error", "code": "item_not_found", "message": "no such item",
                              "param": "item_id", "event_id": "e1"}
