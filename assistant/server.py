"""The server: one ASGI app (Starlette, run by uvicorn) that speaks WebSocket and HTTP on one port.

- ``GET /v1/realtime[?conversation=ID]`` upgrades to the Realtime protocol. The
  dialect is beta when the client sends ``OpenAI-Beta: realtime=v1`` (or the
  ``openai-beta.realtime-v1`` subprotocol), GA otherwise. Browsers pass their key
  as a subprotocol; the server then selects ``realtime``. Plain HTTP there gets 426.
- ``/v1/chat/completions``, ``/v1/models``: the OpenAI-compatible HTTP API
  (:mod:`assistant.http_api`), sharing the engine and its batching with the socket.
- ``GET /healthz`` answers 200 ``ok``; anything else is 404.
- With a TLS context (``--tls-certfile`` / ``--tls-keyfile``) the same routes are
  served as ``wss://`` and ``https://``; the Node ``openai`` SDK only speaks ``wss://``.
- A request that is not HTTP at all is one log line; the ``Server`` header names no versions.

Why ASGI: the ``websockets`` server's handshake hook can answer HTTP but cannot
stream a body, and the HTTP API streams server-sent events. uvicorn runs the app
with its sans-I/O ``websockets`` implementation (the same frame parser as before;
its other implementation is built on websockets' deprecated legacy API).

The server only moves frames: parsing, state and storage live in
:mod:`assistant.session`; it never sees a tensor. Close codes: 1000 normal,
1001 when the server shuts down, 1008 for an unknown conversation or a client
that read nothing for ``send_timeout_s`` (reason ``send_timeout: ...``), 1009
for a message over ``max_message_bytes``, refused at its header before it is
buffered (reason ``message_too_large: ...``), 1013 when the connection limit is
reached. :mod:`assistant.websocket_protocol` enforces the two bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from assistant import http_api
from assistant.errors import ConversationNotFound
from assistant.events import Dialect, EventWriter
from assistant.session import ImageBudget, Session, Settings
from assistant.store import Store
from assistant.websocket_protocol import BoundedWebSocketProtocol

log = logging.getLogger(__name__)
REALTIME_PATH = "/v1/realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
MAX_MODEL_NAME_CHARS = 128
REQUEST_HEAD_TIMEOUT_S = 10.0  # as long as the websockets server gave a client to finish its handshake
NOT_FOUND = f"Not found. The Realtime endpoint is {REALTIME_PATH}; the HTTP API is under /v1.\n"


@dataclass
class App:
    """Everything a connection or request needs, built once by :func:`assistant.app.build_app` (or a test)."""

    store: Store
    engine: Any  # AsyncEngine
    model_name: str
    defaults: Settings
    image_budget: ImageBudget
    max_message_bytes: int
    max_connections: int
    send_timeout_s: float = 30.0  # a client that reads nothing for this long is dropped
    ssl_context: ssl.SSLContext | None = None  # wss:// and https:// when set
    renders_tools: bool = False  # the model's chat template describes tools itself (ChatModel.renders_tools)
    sockets: set[WebSocket] = field(default_factory=set)  # the open Realtime connections

    @property
    def num_connections(self) -> int:
        return len(self.sockets)

    async def close_connections(self, code: int, reason: str) -> None:
        """Close every open Realtime connection (1001 when the server shuts down)."""
        await asyncio.gather(*(_close(websocket, code, reason) for websocket in list(self.sockets)))


def asgi_app(app: App) -> Starlette:
    """The ASGI application: the Realtime socket, the HTTP API, health, and 404 for the rest."""
    routes = [
        WebSocketRoute(REALTIME_PATH, _realtime),
        Route(REALTIME_PATH, _upgrade_required),
        Route("/healthz", _healthz),
        *http_api.routes(),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    starlette.state.app = app
    return starlette


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def _upgrade_required(request: Request) -> Response:
    return PlainTextResponse(f"{REALTIME_PATH} speaks WebSocket only.\n", status_code=426,
                             headers={"Upgrade": "websocket", "Connection": "Upgrade"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and request.url.path.startswith("/v1/"):
        return JSONResponse(http_api.error_body(NOT_FOUND.strip(), "invalid_request_error", "not_found"), 404)
    if exc.status_code == 404:
        return PlainTextResponse(NOT_FOUND, status_code=404)
    if exc.status_code == 405 and request.url.path.startswith("/v1/"):
        message = f"{request.method} is not allowed on {request.url.path}."
        return JSONResponse(http_api.error_body(message, "invalid_request_error", "method_not_allowed"), 405,
                            headers=exc.headers)
    return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code, headers=exc.headers)


async def _realtime(websocket: WebSocket) -> None:
    app: App = websocket.app.state.app
    if app.num_connections >= app.max_connections:
        await websocket.accept()
        await websocket.close(1013, "too many connections, try again later")
        return
    app.sockets.add(websocket)
    try:
        await _serve_connection(app, websocket)
    finally:
        app.sockets.discard(websocket)


async def _serve_connection(app: App, websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols") or []
    # Browsers send ["realtime", "openai-insecure-api-key.KEY", ...]; answer "realtime".
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    writer = EventWriter(_dialect_of(websocket.headers, offered))
    conversation_id = websocket.query_params.get("conversation", "")
    # The SDKs send ?model=NAME; echoing it keeps clients that check session.model happy.
    model_name = websocket.query_params.get("model", "")[:MAX_MODEL_NAME_CHARS] or app.model_name

    async def send(event: dict[str, Any]) -> None:
        if websocket.application_state != WebSocketState.CONNECTED:
            return  # the session notices through close(); nothing to tell a gone client
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_text(json.dumps(event, ensure_ascii=False))

    if conversation_id:
        if not await asyncio.to_thread(app.store.conversation_exists, conversation_id):
            error = ConversationNotFound(f"No conversation '{conversation_id}' is stored here.",
                                         param="conversation")
            await send(writer.error(error))
            await _close(websocket, 1008, "conversation not found")
            return
    else:
        conversation_id = await asyncio.to_thread(app.store.create_conversation)
    session = Session(store=app.store, engine=app.engine, conversation_id=conversation_id,
                      model_name=model_name, settings=app.defaults, image_budget=app.image_budget,
                      writer=writer, send=send, renders_tools=app.renders_tools)
    log.info("connection %s: conversation %s (%s)", session.id, conversation_id, writer.dialect.value)
    await session.start()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            await session.handle(frame)  # at most max_message_bytes: larger ones closed the connection
    finally:
        await session.close()
        log.info("connection %s closed", session.id)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # RuntimeError: it closed meanwhile
            await websocket.close(code, reason)


def _dialect_of(headers: Headers, offered: list[str]) -> Dialect:
    if "realtime=v1" in headers.get("OpenAI-Beta", "") or BETA_SUBPROTOCOL in offered:
        return Dialect.BETA
    return Dialect.GA


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context from PEM files; unreadable or mismatched files raise RuntimeError saying which."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(f"cannot use the TLS certificate {certfile} with key {keyfile}: {exc}") from exc
    return context


class _OneLineBadRequests(logging.Filter):
    """A client that is not speaking HTTP (garbage, a port scan, TLS to a plain port) is the client's
    problem: one INFO line, not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_UVICORN_CHATTER):
            return False  # serve_forever prints the URL itself; start and stop are ours to say
        if message.startswith(("Invalid HTTP request received", "Unsupported upgrade request")):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


_UVICORN_CHATTER = ("Started server process", "Finished server process", "Waiting for application",
                    "Application startup", "Application shutdown", "Uvicorn running on", "Shutting down")
_bad_request_filter = _OneLineBadRequests()


class _H11Protocol(H11Protocol):
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


class Server(uvicorn.Server):
    """uvicorn's server, started and stopped by its owner (signals are :func:`serve_forever`'s), that closes
    Realtime connections with 1001 (going away) when it shuts down: uvicorn itself would send 1012."""

    def __init__(self, app: App, host: str, port: int) -> None:
        config = uvicorn.Config(
            asgi_app(app), host=host, port=port,
            http=_H11Protocol, ws=functools.partial(BoundedWebSocketProtocol, send_timeout_s=app.send_timeout_s),
            lifespan="off",
            log_config=None, access_log=False,
            server_header=False, date_header=False, headers=[("server", "assistant")],  # no versions to match
            ws_max_size=app.max_message_bytes,  # checked on each frame's header: 1009 before buffering it
            timeout_graceful_shutdown=10,
        )
        config.load()
        config.ssl = app.ssl_context  # built and checked by the caller; uvicorn would want the files
        super().__init__(config)
        self.app = app
        self._task: asyncio.Task[None] | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the owner decides when to stop (serve_forever on SIGINT/SIGTERM, tests when done)

    async def start(self) -> None:
        """Listen (an OSError says why not: the port is taken, the address is not this machine's), then serve."""
        self._task = asyncio.create_task(self.serve(sockets=_listen(self.config.host, self.config.port)))
        while not self.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (e.g. the port is taken)
                raise RuntimeError("the server stopped while starting")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.should_exit = True

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the open ones are told to go away
        await self.app.close_connections(1001, "server shutting down")
        await super().shutdown(sockets)


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, as asyncio's own server makes them; bound here
    because uvicorn turns a failed bind into ``sys.exit(3)``."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def url_of(app: App, host: str, port: int) -> str:
    return f"{'wss' if app.ssl_context else 'ws'}://{host}:{port}{REALTIME_PATH}"


async def start_server(app: App, host: str, port: int) -> Server:
    """Start listening (port 0 picks a free port: see ``server.sockets``)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _bad_request_filter not in uvicorn_log.filters:
        uvicorn_log.addFilter(_bad_request_filter)
    server = Server(app, host, port)
    await server.start()
    return server


async def serve_forever(app: App, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then close connections with 1001 and return."""
    server = await start_server(app, host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.close)
    scheme = "https" if app.ssl_context else "http"
    print(f"assistant: listening on {url_of(app, host, port)} and {scheme}://{host}:{port}/v1", flush=True)
    await server.wait_closed()
    log.info("shut down")
