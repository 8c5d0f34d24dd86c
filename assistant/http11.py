"""uvicorn's HTTP/1.1 protocol and log, adjusted for hostile or broken clients.

- A connection whose first request head is not complete within :data:`REQUEST_HEAD_TIMEOUT_S` is closed
  (uvicorn waits forever, so a client that sends half a request would hold a connection).
- The answer to a request that is not HTTP names the server like every other answer.
- A client that is not speaking HTTP (garbage, a port scan, TLS to a plain port) is one INFO line, and
  uvicorn's per-connection lines (which the server says itself) are dropped.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
REQUEST_HEAD_TIMEOUT_S = 10.0  # as long as the websockets server gave a client to finish its handshake


class OneLineBadRequests(logging.Filter):
    """A client that is not speaking HTTP (garbage, a port scan, TLS to a plain port) is the client's
    problem: one INFO line, not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_UVICORN_CHATTER) or '"WebSocket ' in message:
            # serve_forever prints the URL itself; start and stop, connections and refusals are ours to say
            return False
        if message.startswith(("Invalid HTTP request received", "Unsupported upgrade request")):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


_UVICORN_CHATTER = ("Started server process", "Finished server process", "Waiting for application",
                    "Application startup", "Application shutdown", "Uvicorn running on", "Shutting down",
                    # uvicorn 0.54's sans-I/O WebSocket logs this after every denial response (a refused key or
                    # origin, 503 while loading), which it does send; our refusals log their own line.
                    "ASGI callable returned without completing handshake",
                    "connection open", "connection closed", "connection rejected")
bad_request_filter = OneLineBadRequests()


class QuickHeadH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with two changes for hostile or broken clients: a connection whose first
    request head is not complete within :data:`REQUEST_HEAD_TIMEOUT_S` is closed (uvicorn waits forever, so
    a client that sends half a request would hold a connection), and the answer to a request that is not
    HTTP names the server like every other answer (uvicorn's own sends no Server header there)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_later(REQUEST_HEAD_TIMEOUT_S, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None:
            self._stop_head_timer()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._stop_head_timer()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            log.info("closed a connection whose request head did not arrive within %.0f s", REQUEST_HEAD_TIMEOUT_S)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                   (b"server", b"assistant")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
