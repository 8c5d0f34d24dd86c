"""uvicorn's sans-I/O WebSocket protocol with two bounds that keep a hostile or stuck client from growing memory.

- **Messages over the limit are refused at their header.** websockets' parser checks a frame's declared length
  (and a fragmented message's running total, and a compressed message's inflated size) against ``max_size``
  before it reads the payload, so nothing over ``max_message_bytes`` is ever buffered: the connection fails
  with close code 1009 and the reason ``message_too_large: ...`` naming the limit.
- **A client that stops reading is dropped.** uvicorn's send waits until the transport's buffer drains below
  its high-water mark (64 KiB), without a deadline: a client that reads nothing would hold a send, and the
  response behind it, forever. A send that cannot start within ``send_timeout_s`` fails the connection
  (close code 1008, reason ``send_timeout: ...``) and aborts the transport, discarding what it buffered; the
  app sees a disconnect, as if the client had left. uvicorn's own keepalive timeout aborts too (its close
  would wait forever for that buffer to drain).

So what one connection holds is bounded: one incoming message, the transport's buffer (high-water mark plus
one event), and what the engine streams during ``send_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.server import ServerProtocol

from assistant.errors import SEND_TIMEOUT, MessageTooLarge

log = logging.getLogger(__name__)


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol, whose 1009 close reason carries our wire code and the limit."""

    def fail(self, code: int, reason: str = "") -> None:
        if code == CloseCode.MESSAGE_TOO_BIG:
            reason = f"{MessageTooLarge.code}: messages are limited to {self.max_size} bytes"
        super().fail(code, reason)


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """See the module docstring; ``uvicorn.Config(ws=functools.partial(BoundedWebSocketProtocol, send_timeout_s=S),
    ws_max_size=LIMIT)``."""

    def __init__(self, *args: Any, send_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout_s = send_timeout_s
        self.conn = _ServerProtocol(extensions=self.conn.available_extensions, max_size=self.conn.max_size,
                                    logger=self.conn.logger)

    async def send(self, message: ASGISendEvent) -> None:
        if not self.writable.is_set():
            try:
                await asyncio.wait_for(self.writable.wait(), self.send_timeout_s)
            except TimeoutError:
                self._drop_slow_reader()
        await super().send(message)  # raises ClientDisconnected once the transport is gone

    def keepalive_timeout(self) -> None:
        is_failing = not (self.close_sent or self.transport.is_closing())  # else uvicorn lets it be
        super().keepalive_timeout()
        if is_failing:
            self.transport.abort()  # its close() waits for a buffer that a peer that is gone will never drain

    def _drop_slow_reader(self) -> None:
        if self.disconnected:
            return
        log.info("dropped a WebSocket client that read nothing for %.0f s", self.send_timeout_s)
        if self.conn.state is State.OPEN:  # the close frame goes into a buffer the client may never read
            self.conn.fail(CloseCode.POLICY_VIOLATION,
                           f"{SEND_TIMEOUT}: the client read nothing for {self.send_timeout_s:g} s")
            self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.abort()  # connection_lost() follows: the app sees a disconnect, waiting sends wake up
