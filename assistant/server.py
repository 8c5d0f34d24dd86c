"""The WebSocket server: routes, handshakes, and one Session per connection.

- ``GET /v1/realtime[?conversation=ID]`` upgrades to the Realtime protocol. The
  dialect is beta when the client sends ``OpenAI-Beta: realtime=v1`` (or the
  ``openai-beta.realtime-v1`` subprotocol), GA otherwise. Browsers pass their key
  as a subprotocol; the server then selects ``realtime``.
- ``GET /healthz`` answers 200 ``ok``; anything else is 404.
- With a TLS context (``--tls-certfile`` / ``--tls-keyfile``) the same routes are
  served as ``wss://`` and ``https://``; the Node ``openai`` SDK only speaks ``wss://``.
- A failed handshake (plain HTTP, garbage, a client that gives up) is one log
  line; the ``Server`` header names no versions.

The server only moves frames: parsing, state and storage live in
:mod:`assistant.session`; it never sees a tensor. Close codes: 1000 normal,
1001 when the server shuts down, 1008 for an unknown conversation, 1009 for a
frame over twice ``max_message_bytes``
(frames over the limit itself get a ``message_too_large`` error event), 1013 when the connection limit is reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from assistant.errors import ConversationNotFound, MessageTooLarge
from assistant.events import Dialect, EventWriter
from assistant.session import ImageBudget, Session, Settings
from assistant.store import Store

log = logging.getLogger(__name__)
REALTIME_PATH = "/v1/realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
MAX_MODEL_NAME_CHARS = 128


@dataclass
class App:
    """Everything a connection needs, built once by :func:`assistant.cli` (or a test)."""

    store: Store
    engine: Any  # AsyncEngine
    model_name: str
    defaults: Settings
    image_budget: ImageBudget
    max_message_bytes: int
    max_connections: int
    ssl_context: ssl.SSLContext | None = None  # wss:// when set
    num_connections: int = 0

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path != REALTIME_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"Not found. The Realtime endpoint is {REALTIME_PATH}.\n")
        return None

    async def handle(self, connection: ServerConnection) -> None:
        if self.num_connections >= self.max_connections:
            await connection.close(1013, "too many connections, try again later")
            return
        self.num_connections += 1
        try:
            await self._serve_connection(connection)
        finally:
            self.num_connections -= 1

    async def _serve_connection(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        headers = connection.request.headers
        writer = EventWriter(_dialect_of(headers, connection.subprotocol))
        query = parse_qs(urlsplit(connection.request.path).query)
        conversation_id = (query.get("conversation") or [""])[0]
        # The SDKs send ?model=NAME; echoing it keeps clients that check session.model happy.
        model_name = (query.get("model") or [""])[0][:MAX_MODEL_NAME_CHARS] or self.model_name

        async def send(event: dict[str, Any]) -> None:
            try:
                await connection.send(json.dumps(event, ensure_ascii=False))
            except ConnectionClosed:
                pass  # the session notices through close(); nothing to tell a gone client

        if conversation_id:
            if not await asyncio.to_thread(self.store.conversation_exists, conversation_id):
                error = ConversationNotFound(f"No conversation '{conversation_id}' is stored here.",
                                             param="conversation")
                await send(writer.error(error))
                await connection.close(1008, "conversation not found")
                return
        else:
            conversation_id = await asyncio.to_thread(self.store.create_conversation)
        session = Session(store=self.store, engine=self.engine, conversation_id=conversation_id,
                          model_name=model_name, settings=self.defaults, image_budget=self.image_budget,
                          writer=writer, send=send)
        log.info("connection %s: conversation %s (%s)", session.id, conversation_id, writer.dialect.value)
        await session.start()
        try:
            async for frame in connection:
                num_bytes = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
                if num_bytes > self.max_message_bytes:
                    error = MessageTooLarge(f"The message has {num_bytes} bytes; the limit is "
                                            f"{self.max_message_bytes}.")
                    await send(writer.error(error))
                    continue
                await session.handle(frame)
        except ConnectionClosed:
            pass
        finally:
            await session.close()
            log.info("connection %s closed", session.id)


def _dialect_of(headers: Headers, subprotocol: str | None) -> Dialect:
    beta = headers.get("OpenAI-Beta", "")
    offered = headers.get("Sec-WebSocket-Protocol", "")
    if "realtime=v1" in beta or BETA_SUBPROTOCOL in offered:
        return Dialect.BETA
    return Dialect.GA


def _select_subprotocol(connection: ServerConnection, subprotocols: Any) -> str | None:
    # Browsers send ["realtime", "openai-insecure-api-key.KEY", ...]; answer "realtime".
    return "realtime" if "realtime" in subprotocols else None


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context from PEM files; unreadable or mismatched files raise RuntimeError saying which."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(f"cannot use the TLS certificate {certfile} with key {keyfile}: {exc}") from exc
    return context


class _OneLineHandshakeFailures(logging.Filter):
    """A client that fails the opening handshake (plain HTTP, garbage, a port scan, a TLS client that
    gave up) is the client's problem: one log line with the reason, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("server listening on"):
            return False  # serve_forever prints the URL itself
        if message.startswith(("connection rejected (400", "connection rejected (426")):
            return False  # the "opening handshake failed" line that follows says why
        if message == "opening handshake failed" and record.exc_info:
            exc = record.exc_info[1]
            cause = exc.__cause__ or exc.__context__ if exc is not None else None
            reason = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
            if cause is not None:
                reason += f" ({type(cause).__name__}: {cause})"
            record.msg, record.args, record.exc_info, record.exc_text = f"opening handshake failed: {reason}", (), \
                None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_handshake_filter = _OneLineHandshakeFailures()


def url_of(app: App, host: str, port: int) -> str:
    return f"{'wss' if app.ssl_context else 'ws'}://{host}:{port}{REALTIME_PATH}"


async def start_server(app: App, host: str, port: int) -> Server:
    """Start listening (port 0 picks a free port: see ``server.sockets``)."""
    server_logger = logging.getLogger("websockets.server")
    if _handshake_filter not in server_logger.filters:
        server_logger.addFilter(_handshake_filter)
    return await serve(
        app.handle, host, port,
        ssl=app.ssl_context,
        server_header="assistant",  # no versions for a scanner to match
        process_request=app.process_request,
        select_subprotocol=_select_subprotocol,
        # Frames up to twice the limit are read and answered with a coded error;
        # beyond that websockets closes with 1009 without buffering them.
        max_size=2 * app.max_message_bytes,
        # Tokens stream as many small frames; don't let a slow reader grow memory unbounded.
        write_limit=2**20,
    )


async def serve_forever(app: App, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then close connections with 1001 and return."""
    server = await start_server(app, host, port)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"assistant: listening on {url_of(app, host, port)}", flush=True)
    await stop
    log.info("shutting down")
    server.close()  # closes every connection with 1001 (going away)
    await server.wait_closed()
