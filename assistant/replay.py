"""Responses that outlive their connection, and the events a reconnecting client missed.

A response belongs to its conversation, not to the connection that started it. Each conversation with a
response running, or one that ended recently, has a :class:`LiveConversation`: the response's task (at most
one runs per conversation), the connection attached to it (at most one: the one that started it, or the last
one to resume it), and a :class:`ReplayBuffer` of the events it sent. The response's events go into the
buffer first, then to the attached connection, if any; a dropped connection only detaches, and the response
goes on to its end. A client that reconnects with ``?conversation=ID&last_event_id=EVT`` is sent every
event after ``EVT`` from the buffer, then the live stream (:meth:`LiveConversation.attach`).

Invariants:

- no gap, no duplicate: an event is in the buffer before any connection sees it, and :meth:`attach` replays
  until it has caught up and then becomes the subscriber without awaiting in between;
- the buffer also holds, as markers that are never replayed, the ids of the events the attached connection
  got besides the response's own (the last one before the response began, answers to client events), so a
  client whose last event was one of those resumes exactly after it;
- bounded: per conversation by ``max_events`` and ``max_bytes`` (oldest events out), all conversations
  together by ``max_total_bytes`` (conversations without a running response go first, least recently
  active first); a conversation with no running response and nobody attached is dropped ``grace_s`` after
  that began;
- only the event loop touches these objects, so nothing is locked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from assistant.errors import ReplayUnavailable, quote

ENTRY_OVERHEAD_BYTES = 100  # what an event costs in memory besides its JSON text (tuple, deque slot, id)
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ReplayLimits:
    max_events: int  # per conversation
    max_bytes: int  # per conversation
    max_total_bytes: int  # all conversations together
    grace_s: float  # how long a conversation's events are kept once no response runs and nobody is attached


class ReplayBuffer:
    """A conversation's latest events, oldest first, each with a sequence number; bounded in events and bytes.
    An event is held as JSON text (``None`` for a marker: an id that is never replayed)."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._events: deque[tuple[int, str, str | None]] = deque()  # (seq, event_id, JSON or None)
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event_id: str, event: dict[str, Any] | None) -> int:
        """Add an event (None: a marker); returns how many bytes the buffer grew by (negative when it shrank)."""
        text = None if event is None else json.dumps(event)
        before = self.num_bytes
        self._events.append((self._next_seq, event_id, text))
        self._next_seq += 1
        self.num_bytes += _size(event_id, text)
        while len(self._events) > self.max_events or (self.num_bytes > self.max_bytes and len(self._events) > 1):
            self.trim_oldest()
        return self.num_bytes - before

    def trim_oldest(self) -> int:
        """Drop the oldest event; returns the bytes freed."""
        _, event_id, text = self._events.popleft()
        freed = _size(event_id, text)
        self.num_bytes -= freed
        return freed

    def position_after(self, event_id: str) -> int:
        """The sequence number that follows ``event_id``; raises :class:`ReplayUnavailable` when it is not held."""
        for seq, held_id, _ in reversed(self._events):
            if held_id == event_id:
                return seq + 1
        raise ReplayUnavailable(f"The events after '{quote(event_id)}' are no longer held (or never were); "
                                "response.done, or conversation.item.retrieve, has the whole output.",
                                param="last_event_id")

    def since(self, seq: int) -> list[dict[str, Any]]:
        """The events (not markers) from sequence number ``seq`` on; :class:`ReplayUnavailable` when some of them
        were trimmed meanwhile."""
        first = self._events[0][0] if self._events else self._next_seq
        if seq < first:
            raise ReplayUnavailable("The events to replay were dropped while they were sent (the replay buffer "
                                    "is full); response.done has the whole output.", param="last_event_id")
        return [json.loads(text) for _, _, text in itertools.islice(self._events, seq - first, None)
                if text is not None]

    @property
    def end(self) -> int:
        """The sequence number the next event will get."""
        return self._next_seq


def _size(event_id: str, text: str | None) -> int:
    return ENTRY_OVERHEAD_BYTES + len(event_id) + (len(text) if text is not None else 0)


class LiveConversation:
    """One conversation's running (or recently ended) response, its replay buffer and its attached connection."""

    def __init__(self, conversation_id: str, registry: LiveConversations) -> None:
        self.conversation_id = conversation_id
        self.buffer = ReplayBuffer(registry.limits.max_events, registry.limits.max_bytes)
        self.task: asyncio.Task[Any] | None = None
        self.cancel: Callable[[], None] | None = None  # ends the running response as client_cancelled
        self.response_id: str | None = None
        self._registry = registry
        self._owner: object | None = None  # who is attached (a Session), None when nobody is
        self._subscriber: Send | None = None
        self._greeting: tuple[str, int] | None = None  # the last resumed connection's session.created, and its place
        self.last_active = registry.clock()

    @property
    def is_running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def is_idle(self) -> bool:
        return not self.is_running and self._owner is None

    def is_attached(self, owner: object) -> bool:
        return self._owner is owner

    def start(self, response_id: str, task: asyncio.Task[Any], cancel: Callable[[], None]) -> None:
        """The response ``task`` now runs here; ``cancel`` ends it as the client's cancel does."""
        assert not self.is_running, "one response at a time per conversation"
        self.response_id, self.task, self.cancel = response_id, task, cancel
        self._touch()
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task is self.task:  # not a response that ended just before the next one started (callbacks come later)
            self.cancel = None  # it holds the response's whole output, which the buffer's bounds do not count
        self._touch()

    async def publish(self, event: dict[str, Any]) -> None:
        """Send one of the response's events: into the buffer, then to the attached connection."""
        self._registry.grew(self, self.buffer.append(event["event_id"], event))
        if self._subscriber is not None:
            await self._subscriber(event)

    def mark(self, event_id: str) -> None:
        """Note an event the attached connection got besides the response's, so a client may resume after it."""
        self._registry.grew(self, self.buffer.append(event_id, None))

    def attach_now(self, owner: object, send: Send, last_event_id: str | None) -> None:
        """Attach the connection that is starting a response here (it missed nothing); ``last_event_id`` is the
        last event it got, noted so that a client that saw only that one resumes right after it."""
        if last_event_id is not None:
            self.mark(last_event_id)
        self._owner, self._subscriber = owner, send
        self._touch()

    async def attach(self, owner: object, send: Send, last_event_id: str, greeting_id: str | None = None) -> int:
        """Send ``owner``'s connection every event after ``last_event_id``, then the live ones; returns how many
        were replayed. When that event is not held, raises :class:`ReplayUnavailable`, and the connection follows
        the response from now on if it still runs. ``greeting_id`` (the new connection's ``session.created``)
        stands for the same place, should the client drop again before anything was replayed."""
        try:
            return await self._replay(owner, send, last_event_id, greeting_id)
        except ReplayUnavailable:
            if self.is_running:
                self.follow(owner, send)
            raise

    async def _replay(self, owner: object, send: Send, last_event_id: str, greeting_id: str | None) -> int:
        greeting = self._greeting
        seq = greeting[1] if greeting and greeting[0] == last_event_id else self.buffer.position_after(last_event_id)
        self._greeting = None if greeting_id is None else (greeting_id, seq)
        self._owner, self._subscriber = owner, None  # the connection attached before gets no more events
        num_replayed = 0
        while seq < self.buffer.end:
            events = self.buffer.since(seq)  # raises if the buffer moved past what was sent
            seq = self.buffer.end
            for event in events:
                if not self.is_attached(owner):  # another connection took over while this one replayed
                    return num_replayed
                await send(event)
                num_replayed += 1
        if self.is_attached(owner):
            self._subscriber = send  # caught up: no await since the last check, so nothing falls between
        self._touch()
        return num_replayed

    def follow(self, owner: object, send: Send) -> None:
        """Attach without replay (the client's last event is gone): the live events from now on."""
        self._owner, self._subscriber = owner, send
        self._touch()

    def detach(self, owner: object) -> bool:
        """``owner``'s connection is gone; returns whether it was the attached one."""
        if self._owner is not owner:
            return False
        self._owner, self._subscriber = None, None
        self._touch()
        return True

    def _touch(self) -> None:
        self.last_active = self._registry.clock()


class LiveConversations:
    """The server's live conversations by id (one per App); expired ones are dropped when it is next used."""

    def __init__(self, limits: ReplayLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.num_bytes = 0  # all buffers together
        self._conversations: dict[str, LiveConversation] = {}

    def __len__(self) -> int:
        return len(self._conversations)

    def get(self, conversation_id: str) -> LiveConversation | None:
        self.expire()
        return self._conversations.get(conversation_id)

    def open(self, conversation_id: str) -> LiveConversation:
        """The conversation's live state, made when it has none."""
        live = self.get(conversation_id)
        if live is None:
            live = self._conversations[conversation_id] = LiveConversation(conversation_id, self)
        return live

    def expire(self) -> None:
        """Drop the conversations idle for longer than the grace period."""
        deadline = self.clock() - self.limits.grace_s
        for conversation_id, live in list(self._conversations.items()):
            if live.is_idle and live.last_active <= deadline:
                self._drop(conversation_id)

    def grew(self, live: LiveConversation, num_bytes: int) -> None:
        """Account for a buffer's growth; over the total, drop or trim others (never the one growing whole)."""
        self.num_bytes += num_bytes
        if self.num_bytes <= self.limits.max_total_bytes:
            return
        self.expire()
        # Conversations without a running response first, least recently active first; then running ones.
        victims = sorted((other for other in self._conversations.values() if other is not live),
                         key=lambda other: (other.is_running, other.last_active))
        for other in victims:
            if self.num_bytes <= self.limits.max_total_bytes:
                return
            if other.is_running or not other.is_idle:
                self._trim(other)  # it must stay findable, but its oldest events may go
            else:
                self._drop(other.conversation_id)
        self._trim(live)

    def _trim(self, live: LiveConversation) -> None:
        while self.num_bytes > self.limits.max_total_bytes and len(live.buffer) > 1:
            self.num_bytes -= live.buffer.trim_oldest()

    def _drop(self, conversation_id: str) -> None:
        live = self._conversations.pop(conversation_id)
        self.num_bytes -= live.buffer.num_bytes
