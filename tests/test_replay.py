"""The replay buffer and the live conversations without sockets: bounds, expiry, and attaching without a gap or a
duplicate while a response publishes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from assistant.errors import ReplayUnavailable
from assistant.replay import ENTRY_OVERHEAD_BYTES, LiveConversations, ReplayBuffer, ReplayLimits


def event(n: int, text: str = "x") -> dict[str, Any]:
    return {"type": "response.output_text.delta", "event_id": f"event_{n}", "delta": text}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limits(**overrides: Any) -> ReplayLimits:
    return ReplayLimits(**{"max_events": 100, "max_bytes": 100_000, "max_total_bytes": 1_000_000, "grace_s": 30.0,
                           **overrides})


def test_the_buffer_replays_what_followed_an_event_in_order_without_markers() -> None:
    buffer = ReplayBuffer(max_events=10, max_bytes=100_000)
    buffer.append("event_seen", None)  # a marker: the last event the client got before the response
    for n in range(3):
        buffer.append(f"event_{n}", event(n, "é"))
    assert buffer.since(buffer.position_after("event_seen")) == [event(0, "é"), event(1, "é"), event(2, "é")]
    assert buffer.since(buffer.position_after("event_1")) == [event(2, "é")]
    assert buffer.since(buffer.position_after("event_2")) == []
    with pytest.raises(ReplayUnavailable) as info:
        buffer.position_after("event_never")
    assert (info.value.code, info.value.param) == ("replay_unavailable", "last_event_id")


def test_the_buffer_is_bounded_in_events_and_bytes() -> None:
    buffer = ReplayBuffer(max_events=5, max_bytes=100_000)
    for n in range(8):
        buffer.append(f"event_{n}", event(n))
    assert len(buffer) == 5
    with pytest.raises(ReplayUnavailable):
        buffer.position_after("event_2")  # trimmed: stale
    assert buffer.since(buffer.position_after("event_3"))[0] == event(4)
    one = ReplayBuffer(max_events=100, max_bytes=100_000)
    size = one.append("event_0", event(0, "y" * 500))
    assert size > 500 + ENTRY_OVERHEAD_BYTES
    small = ReplayBuffer(max_events=100, max_bytes=3 * size)
    for n in range(10):
        small.append(f"event_{n}", event(n, "y" * 500))
    assert len(small) == 3 and small.num_bytes <= 3 * size


def test_events_trimmed_while_being_replayed_say_so() -> None:
    buffer = ReplayBuffer(max_events=3, max_bytes=100_000)
    buffer.append("event_0", event(0))
    position = buffer.position_after("event_0")
    for n in range(1, 6):
        buffer.append(f"event_{n}", event(n))
    with pytest.raises(ReplayUnavailable):
        buffer.since(position)


async def test_attaching_while_a_response_publishes_gives_each_event_once_in_order() -> None:
    live = LiveConversations(limits()).open("conv_1")
    for n in range(50):
        await live.publish(event(n))
    received: list[dict[str, Any]] = []

    async def slow_send(e: dict[str, Any]) -> None:
        received.append(e)
        await asyncio.sleep(0)  # the response publishes meanwhile

    async def publish_more() -> None:
        for n in range(50, 100):
            await live.publish(event(n))
            await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_more())
    await live.attach("client", slow_send, "event_9")
    await publisher
    assert [e["event_id"] for e in received] == [f"event_{n}" for n in range(10, 100)]


async def test_a_new_connection_takes_over_and_the_old_one_gets_nothing_more() -> None:
    live = LiveConversations(limits()).open("conv_1")
    old: list[str] = []
    new: list[str] = []

    async def to(sink: list[str]) -> Any:
        async def send(e: dict[str, Any]) -> None:
            sink.append(e["event_id"])
        return send

    live.attach_now("old", await to(old), None)
    await live.publish(event(0))
    await live.attach("new", await to(new), "event_0")
    await live.publish(event(1))
    assert (old, new) == (["event_0"], ["event_1"])
    assert not live.detach("old") and live.is_attached("new")  # the old connection's close changes nothing
    assert live.detach("new") and live.is_idle


def test_idle_conversations_expire_after_the_grace_period() -> None:
    clock = Clock()
    conversations = LiveConversations(limits(grace_s=30.0), clock)
    live = conversations.open("conv_1")
    live.mark("event_0")
    clock.now = 29.0
    assert conversations.get("conv_1") is live
    clock.now = 31.0
    assert conversations.get("conv_1") is None and conversations.num_bytes == 0
    attached = conversations.open("conv_2")
    attached.attach_now("client", _ignore, None)
    clock.now = 1000.0
    assert conversations.get("conv_2") is attached  # someone is attached: kept


async def test_the_total_bound_drops_idle_conversations_first_then_trims() -> None:
    clock = Clock()
    one_event = ReplayBuffer(1, 10**9).append("event_0", event(0))
    conversations = LiveConversations(limits(max_total_bytes=10 * one_event), clock)
    idle = conversations.open("conv_idle")
    for n in range(4):
        await idle.publish(event(n))
    clock.now = 1.0
    busy = conversations.open("conv_busy")
    busy.attach_now("client", _ignore, None)
    for n in range(8):
        await busy.publish(event(n))
    assert conversations.get("conv_idle") is None  # idle went first, whole
    assert conversations.num_bytes <= 10 * one_event
    for n in range(8, 30):
        await busy.publish(event(n))
    assert conversations.num_bytes <= 10 * one_event and 9 <= len(busy.buffer) <= 10  # then its oldest events
    assert conversations.num_bytes == busy.buffer.num_bytes


async def _ignore(e: dict[str, Any]) -> None:
    pass


async def test_a_client_that_drops_again_before_the_replay_resumes_from_its_greeting() -> None:
    live = LiveConversations(limits()).open("conv_1")
    for n in range(5):
        await live.publish(event(n))
    await live.attach("first", _ignore, "event_1", greeting_id="event_hello")  # its replay was lost in transit
    received: list[str] = []

    async def collect(e: dict[str, Any]) -> None:
        received.append(e["event_id"])

    await live.attach("second", collect, "event_hello")  # the only event it saw: the first session.created
    assert received == ["event_2", "event_3", "event_4"]
