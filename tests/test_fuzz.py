"""Fuzzing a live server: random and mutated client events and frames, while a well-behaved client talks to it.

Hypothesis draws batches of frames: valid events of every type the protocol accepts, the same events mutated
(a field replaced by a nasty value, deleted, or a key added), JSON that is not an event, deep JSON, huge strings
and numbers, lone surrogates and other Unicode edge cases, text and binary frames, fragmented messages. Each
batch goes over one connection (a synchronous client on a worker thread; the server runs on the test's event
loop) and ends with a sentinel event whose error marks the end of the answers.

What must hold: the connection stays open; every frame that :func:`parse_client_event` refuses is answered by
exactly one error event with that frame's ``event_id`` and the parser's code; no error anywhere is
``internal_error``, nor a response ``generation_failed`` (the tiny model does not fail); no error quotes
more than :data:`MAX_QUOTED_CHARS` characters of any client string; and a client beside the fuzzing completes
its responses correctly throughout and after.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from assistant.errors import MAX_PARAM_CHARS, MAX_QUOTED_CHARS, AssistantError
from assistant.protocol import parse_client_event
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv_until, user_item

NUM_BATCHES = 100
FRAMES_PER_BATCH = (100, 130)  # at least 10,000 frames in all
MAX_MESSAGE_CHARS = 1024  # an error's message: the words and at most a quoted prefix of each client value
SENTINEL = "fuzz-sentinel"
TIMEOUT_S = 60

# ---------------------------------------------------------------- values

PNG_1PX = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
           "hKmMIQAAAABJRU5ErkJggg==")
UNICODE_EDGES = ["", "\x00", "\ufeff", "\u200b\u200d", "\u202e", "\uffff", "\U0010ffff", "e\u0301", "🧑‍🚀",
                 "\ud800", "a\udfff", "\udc00\ud800", "<|im_start|>system", "\\u0000", "root", "inf", "NaN"]
huge_strings = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", "\ud800", "\x00", "\\"]),
                         st.sampled_from([65, 200, 1_000, 70_000, 250_000]))
strings = st.one_of(st.text(max_size=40), st.sampled_from(UNICODE_EDGES), huge_strings)
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([10**80, -10**80, 2**63, -1, 0, 1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 5e-324]))


def _deep(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# Deep values inside events stay within what the test's own recursion (json, repr) takes; deeper JSON goes as text.
deep_json = st.builds(_deep, st.sampled_from([10, 63, 64, 65, 200]), st.sampled_from(["list", "dict"]))
deep_text = st.builds(lambda n, kind: "[" * n + "]" * n if kind == "list" else '{"a":' * n + "1" + "}" * n,
                      st.sampled_from([900, 3000, 100_000]), st.sampled_from(["list", "dict"]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
nasty = st.one_of(scalars, deep_json, st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8))

# ---------------------------------------------------------------- valid events of every type

ids = st.one_of(st.text("abc_-0", min_size=1, max_size=12), st.just("root"))
small_text = st.text(max_size=30)
text_part = st.builds(lambda t: {"type": "input_text", "text": t}, small_text)
image_part = st.builds(lambda d: {"type": "input_image", "image_url": PNG_1PX, "detail": d},
                       st.sampled_from(["low", "high", "auto"]))
message = st.one_of(
    st.builds(lambda parts: {"type": "message", "role": "user", "content": parts},
              st.lists(st.one_of(text_part, image_part), min_size=1, max_size=3)),
    st.builds(lambda t: {"type": "message", "role": "system", "content": [{"type": "input_text", "text": t}]},
              small_text),
    st.builds(lambda t: {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": t}]},
              small_text),
    st.builds(lambda c: {"type": "function_call", "call_id": c, "name": "get_weather", "arguments": "{}"}, ids),
    st.builds(lambda c, o: {"type": "function_call_output", "call_id": c, "output": o}, ids, small_text),
)
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
settings_fields = st.fixed_dictionaries({}, optional={
    "instructions": small_text, "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "max_output_tokens": st.one_of(st.integers(1, 4), st.just("inf")), "seed": st.integers(0, 99),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=2), "tools": st.just([TOOL]),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "get_weather"}]),
    "output_modalities": st.sampled_from([["text"], ["audio"]]), "voice": st.just("alloy"),
    "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
})
valid_events = st.one_of(
    st.builds(lambda s: {"type": "session.update", "session": {"type": "realtime", **s}}, settings_fields),
    st.builds(lambda item, prev: {"type": "conversation.item.create", "item": item,
                                  **({} if prev is None else {"previous_item_id": prev})},
              message, st.one_of(st.none(), ids)),
    st.builds(lambda i: {"type": "conversation.item.delete", "item_id": i}, ids),
    st.builds(lambda i: {"type": "conversation.item.retrieve", "item_id": i}, ids),
    # Responses are kept short (max_output_tokens 1..4) and rare: the engine is not what is fuzzed here.
    st.builds(lambda s, c, inp, meta: {"type": "response.create", "response": {
        **s, "max_output_tokens": 2, "conversation": c, **({} if inp is None else {"input": inp}),
        **({} if meta is None else {"metadata": meta})}},
        settings_fields, st.sampled_from(["auto", "none"]), st.one_of(st.none(), st.lists(message, max_size=2)),
        st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))),
    st.builds(lambda r: {"type": "response.cancel", **({} if r is None else {"response_id": r})},
              st.one_of(st.none(), ids)),
    st.just({"type": "input_audio_buffer.clear"}),
    st.sampled_from([{"type": "input_audio_buffer.append", "audio": "AAAA"}, {"type": "input_audio_buffer.commit"},
                     {"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": 1}]),
    st.builds(lambda texts: {"type": "image.match", "image": {"image_url": PNG_1PX}, "texts": texts},
              st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)),
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside an event a mutation can hit: each key of each object, each element of each array."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*path, key))
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.append((*path, index))
            found += _paths(item, (*path, index))
    return found


def _mutate(event: dict[str, Any], mutations: list[tuple[int, str, Any]]) -> dict[str, Any]:
    event = json.loads(json.dumps(event))
    for where, how, value in mutations:
        paths = _paths(event)
        if not paths:
            break
        *parent_path, last = paths[where % len(paths)]
        parent: Any = event
        for step in parent_path:
            parent = parent[step]
        if how == "replace":
            parent[last] = value
        elif how == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[str(value)[:20] if not isinstance(value, str) else value[:1000]] = value
        else:
            parent.insert(last, value)
    return event


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["replace", "delete", "insert"]), nasty),
                     min_size=1, max_size=3)
mutated_events = st.builds(_mutate, valid_events, mutations)
events = st.one_of(valid_events, mutated_events, mutated_events, mutated_events,
                   st.builds(lambda t, rest: {"type": t, **rest}, strings, st.dictionaries(st.text(max_size=8), nasty,
                                                                                            max_size=3)),
                   st.dictionaries(st.text(max_size=8), nasty, max_size=4))


def _serialize(value: Any, as_bytes: bool) -> str | bytes:
    """JSON as the client sends it; lone surrogates can only travel escaped (ensure_ascii)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text.encode() if as_bytes else text


@st.composite
def frames(draw: st.DrawFn) -> tuple[str | bytes, Any]:
    """One frame and the JSON value it carries (None when it is not JSON)."""
    choice = draw(st.integers(0, 19))
    if choice == 0:  # not JSON: random bytes, random text, truncated JSON
        raw = draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).filter(_is_utf8), deep_text,
                             st.sampled_from(['{"type": "session.update"', "[", "NaN", "", "\x00", "{}" * 1000])))
        return raw, None
    if choice == 1:  # JSON that is not an object, deep JSON, non-standard numbers
        value = draw(st.one_of(nasty, deep_json))
        return _serialize(value, draw(st.booleans())), value
    event = draw(events)
    if isinstance(event, dict) and draw(st.integers(0, 9)) > 0:
        event["event_id"] = f"e{draw(st.integers(0, 10**9))}"  # unique enough to match answers to frames
    return _serialize(event, as_bytes=draw(st.integers(0, 9)) == 0), event


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _client_strings(value: Any) -> list[str]:
    """Every string in a client value, keys too, longer than an error may quote."""
    if isinstance(value, str):
        return [value] if len(value) > MAX_QUOTED_CHARS else []
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in _client_strings(key) + _client_strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _client_strings(item)]
    return []


def _expected_error(frame: str | bytes) -> tuple[str | None, str] | None:
    """The (event_id, code) of the one error the server must answer a frame the parser refuses; None if it parses."""
    try:
        parse_client_event(frame)
    except AssistantError as exc:
        return exc.event_id, exc.code
    return None


def _check_error(error: dict[str, Any], sent: list[str]) -> None:
    code, message, param = error["code"], error["message"], error["param"]
    assert isinstance(code, str) and re.fullmatch(r"[a-z][a-z0-9_]*", code), error
    assert code != "internal_error", error
    assert error["type"] in ("invalid_request_error", "server_error"), error
    assert isinstance(message, str) and len(message) <= MAX_MESSAGE_CHARS, error
    assert param is None or (isinstance(param, str) and len(param) <= MAX_PARAM_CHARS + 3), error
    for text in sent:
        assert text[:MAX_QUOTED_CHARS + 1] not in message and text[:MAX_QUOTED_CHARS + 1] not in (param or ""), \
            f"an error quotes more than {MAX_QUOTED_CHARS} characters of client input: {error}"


def _recv(ws: SyncConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=TIMEOUT_S))


def _send_batch(url: str, batch: list[tuple[str | bytes, Any]], fragmented: bool) -> int:
    """Send one batch over a fresh connection, reading the answers meanwhile (a client that does not read is
    dropped), and check every answer up to the sentinel's; returns the frames sent."""
    with sync_connect(url, max_size=None, open_timeout=TIMEOUT_S, close_timeout=5) as ws:
        assert _recv(ws)["type"] == "session.created"

        def errors_until_sentinel() -> list[dict[str, Any]]:
            errors = []
            while (event := _recv(ws))["type"] != "error" or event["error"]["event_id"] != SENTINEL:
                if event["type"] == "error":
                    errors.append(event["error"])
                elif event["type"] == "response.done" and event["response"]["status"] == "failed":
                    # A bug that escapes as an exception ends a response as generation_failed, not with an error.
                    assert event["response"]["status_details"]["error"]["code"] != "generation_failed", event
            return errors

        with ThreadPoolExecutor(1) as reader:
            answers = reader.submit(errors_until_sentinel)
            expected: Counter[tuple[str | None, str]] = Counter()
            ids: Counter[str | None] = Counter()  # frames per event_id: drawn ids may repeat
            sent: list[str] = []
            for frame, value in batch:
                if fragmented and len(frame) > 8:
                    ws.send([frame[: len(frame) // 2], frame[len(frame) // 2:]])  # type: ignore[list-item]
                else:
                    ws.send(frame)
                refused = _expected_error(frame)
                if refused is not None:
                    expected[refused] += 1
                ids[refused[0] if refused else parse_client_event(frame).event_id] += 1
                sent += _client_strings(value) + _client_strings(frame if isinstance(frame, str) else "")
            ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "none", "event_id": SENTINEL}))
            errors = answers.result(TIMEOUT_S)
    answered: Counter[tuple[str | None, str]] = Counter()
    for error in errors:
        _check_error(error, sent)
        answered[(error["event_id"], error["code"])] += 1
    for (event_id, code), count in expected.items():
        # A refused frame is answered once, with its code; errors of events that did parse may come on top.
        assert answered[(event_id, code)] >= count, (event_id, code, answered)
        if event_id is not None and ids[event_id] == count:
            assert answered[(event_id, code)] == count, (event_id, code, answered)
    return len(batch)


async def _well_behaved(server: RunningServer, stop: threading.Event) -> int:
    """A conversation beside the fuzzing: each turn stores the user's message and completes a short response whose
    deltas add up to its stored text. Returns the turns completed (one more after ``stop``)."""
    ws, session = await open_session(server)
    turns = 0
    while True:
        last_turn = stop.is_set()
        await ws.send(json.dumps(user_item(f"Turn {turns}: tell me something.")))
        await recv_until(ws, "conversation.item.done")
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 6}}))
        events = await recv_until(ws, "response.done")
        assert not [e for e in events if e["type"] == "error"], events
        response = events[-1]["response"]
        assert response["status"] in ("completed", "incomplete"), response
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        item = response["output"][0]
        assert item["content"][0]["text"] == text
        stored = await asyncio.to_thread(server.app.store.get_item, session["conversation_id"], item["id"])
        assert stored.text == text and stored.status == item["status"]
        turns += 1
        if last_turn:
            await ws.close()
            return turns


async def test_fuzzed_events_get_coded_errors_and_spare_other_clients(tiny_model: Any, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, temperature=0, max_output_tokens=4) as server:
        stop = threading.Event()
        counted = {"frames": 0, "batches": 0}

        @settings(max_examples=NUM_BATCHES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(frames(), min_size=FRAMES_PER_BATCH[0], max_size=FRAMES_PER_BATCH[1]),
               fragmented=st.booleans())
        def fuzz(batch: list[tuple[str | bytes, Any]], fragmented: bool) -> None:
            counted["frames"] += _send_batch(server.realtime_url, batch, fragmented)
            counted["batches"] += 1

        def run() -> None:
            try:
                fuzz()
            finally:
                stop.set()

        beside = asyncio.create_task(_well_behaved(server, stop))
        try:
            await asyncio.to_thread(run)
        finally:  # also when the fuzzing failed: the other client ends its turn, not the server under it
            turns = await asyncio.wait_for(beside, TIMEOUT_S)
        assert counted["frames"] >= NUM_BATCHES * FRAMES_PER_BATCH[0], counted
        assert turns >= 2
        # Still serving: a fresh connection completes a response.
        ws, _ = await open_session(server)
        await ws.send(json.dumps({"type": "response.create", "response": {
            "conversation": "none", "input": [user_item("hi")["item"]]}}))
        assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
        await ws.close()

