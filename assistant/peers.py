"""Replicas that cooperate: a cancel, or a client resuming a response that runs on another replica, reaches it.

Replicas share one PostgreSQL database, so they talk through its ``LISTEN``/``NOTIFY``: no other service
to run, secure and reachable wherever the database is, and notifications are delivered in order to every
listener (Redis pub/sub would add a server to deploy and secure for no gain at this volume). With SQLite
there is one server and no peers.

- ``assistant_peers``, every replica listens: ``{"op": "cancel", "conversation"}`` ends that conversation's
  running response wherever it runs; ``{"op": "follow", "conversation", "after", "reply", "token"}`` asks the
  replica running it to replay every event after ``after`` and then relay the live ones to ``reply``;
  ``{"op": "unfollow", "token"}`` stops that.
- ``assistant_peer_<hash of the owner id>``, each replica its own: the relayed events, ``{"token", "event"}``
  (an event over :data:`MAX_PART_CHARS` is sent in parts, ``"part"`` / ``"parts"``), or ``{"token", "error"}``
  when the replay is not possible (its coded error).

Which replica runs a conversation's response is in the database (``responses.owner`` of the one
``in_progress``), so a replica asks only when one runs elsewhere. Everything here runs on the event loop;
the two connections (one listens, one notifies) are psycopg's async ones, reconnected when the database
comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from assistant.errors import ReplayUnavailable
from assistant.replay import LiveConversations

log = logging.getLogger(__name__)
CONTROL = "assistant_peers"
MAX_PART_CHARS = 3500  # NOTIFY payloads stop at 8000 bytes; this much ASCII JSON, escaped once more, fits
RECONNECT_S = 2.0
Send = Callable[[dict[str, Any]], Awaitable[None]]


def channel_of(owner: str) -> str:
    return "assistant_peer_" + hashlib.sha256(owner.encode()).hexdigest()[:16]


@dataclass
class _Follower:
    """A connection here following a response that runs on another replica."""

    send: Send
    on_error: Callable[[ReplayUnavailable], Awaitable[None]]
    parts: list[str] = field(default_factory=list)  # of an event sent in parts


@dataclass(frozen=True)
class _Relay:
    """A connection elsewhere that this replica relays a conversation's response to (a LiveConversation owner)."""

    token: str


class Peers:
    def __init__(self, database_url: str, owner: str, live: LiveConversations) -> None:
        url = make_url(database_url)
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.channel = channel_of(owner)
        self.live = live
        self._followers: dict[str, _Follower] = {}  # by token
        self._relays: dict[str, tuple[str, _Relay]] = {}  # token → (conversation, relay owner)
        self._notifier: Any = None  # psycopg.AsyncConnection
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen (in the background from now on); returns once listening, or after a first failed try."""
        self._task = asyncio.create_task(self._listen_forever())
        await asyncio.wait([asyncio.ensure_future(self._listening.wait()), self._task], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.close()

    # ------------------------------------------------------------ asking others

    async def cancel(self, conversation_id: str) -> None:
        await self._notify(CONTROL, {"op": "cancel", "conversation": conversation_id})

    async def follow(self, conversation_id: str, after: str, send: Send,
                     on_error: Callable[[ReplayUnavailable], Awaitable[None]]) -> str:
        """Ask the replica running ``conversation_id``'s response to send every event after ``after``, then the
        live ones, to ``send``; returns a token for :meth:`unfollow`."""
        token = secrets.token_hex(8)
        self._followers[token] = _Follower(send, on_error)
        await self._notify(CONTROL, {"op": "follow", "conversation": conversation_id, "after": after,
                                     "reply": self.channel, "token": token})
        return token

    async def unfollow(self, token: str) -> None:
        if self._followers.pop(token, None) is not None:
            await self._notify(CONTROL, {"op": "unfollow", "token": token})

    # ------------------------------------------------------------ listening

    async def _listen_forever(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as connection:
                    await connection.execute(f"LISTEN {CONTROL}")
                    await connection.execute(f"LISTEN {self.channel}")
                    self._listening.set()
                    async for notify in connection.notifies():
                        await self._on_notify(notify.channel, notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  the database went away: listen again when it is back
                log.warning("peers: listening stopped (%s); retrying in %.0f s", type(exc).__name__, RECONNECT_S)
                self._listening.set()  # start() does not wait for a database that is down
                await asyncio.sleep(RECONNECT_S)

    async def _on_notify(self, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if channel == CONTROL:
                await self._on_control(message)
            else:
                await self._on_relayed(message)
        except Exception:
            log.exception("peers: could not handle a notification on %s", channel)

    async def _on_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "unfollow":
            entry = self._relays.pop(message["token"], None)
            if entry is not None:
                live = self.live.get(entry[0])
                if live is not None:
                    live.detach(entry[1])
            return
        live = self.live.get(message["conversation"])
        if live is None or not live.is_running:
            return  # not ours
        if op == "cancel":
            assert live.cancel is not None
            log.info("peers: cancelling response %s, as asked by another replica", live.response_id)
            live.cancel()
        elif op == "follow":
            relay = _Relay(message["token"])
            self._relays[relay.token] = (message["conversation"], relay)
            asyncio.create_task(self._relay(live, relay, message["after"], message["reply"]))

    async def _relay(self, live: Any, relay: _Relay, after: str, reply: str) -> None:
        async def send(event: dict[str, Any]) -> None:
            await self._send_event(reply, relay.token, event)

        try:
            await live.attach(relay, send, after)
        except ReplayUnavailable as exc:  # the live events follow, if it still runs (attach saw to it)
            await self._notify(reply, {"token": relay.token, "error": exc.message})

    async def _send_event(self, reply: str, token: str, event: dict[str, Any]) -> None:
        text = json.dumps(event, ensure_ascii=True)  # ASCII: escaping it again at most doubles it
        if len(text) <= MAX_PART_CHARS:
            await self._notify(reply, {"token": token, "event": text})
            return
        parts = [text[i:i + MAX_PART_CHARS] for i in range(0, len(text), MAX_PART_CHARS)]
        for index, part in enumerate(parts):
            await self._notify(reply, {"token": token, "part": part, "index": index, "parts": len(parts)})

    async def _on_relayed(self, message: dict[str, Any]) -> None:
        follower = self._followers.get(message["token"])
        if follower is None:
            return
        if "error" in message:
            await follower.on_error(ReplayUnavailable(message["error"], param="last_event_id"))
            return
        if "part" in message:
            follower.parts.append(message["part"])
            if message["index"] + 1 < message["parts"]:
                return
            text, follower.parts = "".join(follower.parts), []
        else:
            text = message["event"]
        event = json.loads(text)
        await follower.send(event)
        if event.get("type") == "response.done":
            self._followers.pop(message["token"], None)

    # ------------------------------------------------------------ notifying

    async def _notify(self, channel: str, message: dict[str, Any]) -> None:
        import psycopg

        payload = json.dumps(message, ensure_ascii=True)
        async with self._send_lock:
            for attempt in range(2):  # a connection the database dropped is replaced once
                try:
                    if self._notifier is None or self._notifier.closed:
                        self._notifier = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                    await self._notifier.execute("SELECT pg_notify(%s, %s)", (channel, payload))
                    return
                except psycopg.OperationalError:
                    self._notifier = None
                    if attempt:
                        raise
