"""The server: one ASGI app (Starlette, run by uvicorn) that speaks WebSocket and HTTP on one port.

- ``GET /v1/realtime[?conversation=ID]`` upgrades to the Realtime protocol. The
  dialect is beta when the client sends ``OpenAI-Beta: realtime=v1`` (or the
  ``openai-beta.realtime-v1`` subprotocol), GA otherwise. Browsers pass their key
  as a subprotocol; the server then selects ``realtime``. Plain HTTP there gets 426.
- ``/v1/chat/completions``, ``/v1/models``: the OpenAI-compatible HTTP API
  (:mod:`assistant.http_api`), sharing the engine and its batching with the socket.
- ``/healthz``, ``/readyz``, ``/metrics`` and the chat page at ``/``: :mod:`assistant.ops`; anything else is
  404. While the model loads, only those answer (the rest is 503 ``model_loading``).
- Before any route: :mod:`assistant.access` refuses pages from other origins (403) and, when keys are
  required, a missing, unknown or revoked key (401), and names the caller's tenant. A connection sees
  only its tenant's conversations, and is counted against its tenant's bounds (:mod:`assistant.limits`).
- A connection without ``?conversation=`` gets a fresh conversation id; the conversation is stored with
  its first item or response, so a connection that writes nothing leaves nothing behind. A response outlives
  its connection (:mod:`assistant.replay`); ``?conversation=ID&last_event_id=EVT`` (extension) replays the
  events after EVT, then follows the response live.
- With a TLS context (``--tls-certfile`` / ``--tls-keyfile``) the same routes are
  served as ``wss://`` and ``https://``; the Node ``openai`` SDK only speaks ``wss://``.
- A request that is not HTTP at all is one log line; the ``Server`` header names no versions.

Why ASGI: the ``websockets`` server's handshake hook can answer HTTP but cannot
stream a body, and the HTTP API streams server-sent events. uvicorn runs the app
with its sans-I/O ``websockets`` implementation (the same frame parser as before;
its other implementation is built on websockets' deprecated legacy API).

The server only moves frames: parsing, state and storage live in
:mod:`assistant.session`; it never sees a tensor. Close codes: 1000 normal,
1012 when the server shuts down (after the drain), 1008 for an unknown conversation or a client
that read nothing for ``send_timeout_s`` (reason ``send_timeout: ...``), 1009 for a message over
``max_message_bytes``, refused at its header before it is buffered (reason ``message_too_large: ...``),
1013 when the connection limit (total, or the tenant's) is reached or the conversation store is
unavailable (after a ``storage_unavailable`` error event). :mod:`assistant.websocket_protocol` enforces
the two bounds.

Shutting down (SIGTERM/SIGINT, or :meth:`Server.close`) drains (:mod:`assistant.drain`): the
listening sockets close, so new connections are refused; open ones stay, but start no new
response; running responses get ``drain_timeout`` seconds to finish, the rest end
``incomplete`` (``server_shutdown``); then every Realtime socket closes with 1012 (service
restart, which the SDKs reconnect after). A second signal stops the waiting.
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
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from assistant import conversations_api, http_api, ops
from assistant.access import Access, tenant_of
from assistant.drain import Drain
from assistant.errors import ConversationNotFound, StorageUnavailable, quote
from assistant.events import Dialect, EventWriter
from assistant.http11 import QuickHeadH11Protocol, bad_request_filter
from assistant.images import ImageLimits
from assistant.limits import TenantLimits
from assistant.metrics import Metrics
from assistant.peers import Peers
from assistant.pending_writes import PendingWrites
from assistant.replay import LiveConversations, ReplayLimits
from assistant.session import ImageBudget, Session, Settings
from assistant.store import Store, new_conversation_id
from assistant.upkeep import run_upkeep
from assistant.websocket_protocol import BoundedWebSocketProtocol

log = logging.getLogger(__name__)
REALTIME_PATH = "/v1/realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
MAX_MODEL_NAME_CHARS = 128
NOT_FOUND = f"Not found. The Realtime endpoint is {REALTIME_PATH}; the HTTP API is under /v1.\n"


@dataclass
class App:
    """Everything a connection or request needs, built by :func:`assistant.app.open_app`; the engine and what
    depends on the model are set by :func:`assistant.app.load_engine`, and until then only probes are served."""

    store: Store
    model_name: str
    defaults: Settings
    max_message_bytes: int
    max_connections: int
    drain: Drain  # the running responses, and whether new ones may start
    engine: Any = None  # MeteredEngine(AsyncEngine): None while the model loads
    # Set with the engine: until a model says otherwise, one that takes no images.
    image_budget: ImageBudget = field(default_factory=lambda: ImageBudget(ImageLimits(), 0, 0, 0, None))
    send_timeout_s: float = 30.0  # a client that reads nothing for this long is dropped
    ssl_context: ssl.SSLContext | None = None  # wss:// and https:// when set
    renders_tools: bool = False  # the model's chat template describes tools itself (ChatModel.renders_tools)
    # Access (assistant.access): a key's tenant (None: unknown or revoked); None when no keys are required.
    tenant_of: Callable[[str], str | None] | None = None
    allowed_origins: frozenset[str] = frozenset()  # besides the server's own; "*" for any
    limits: TenantLimits = field(default_factory=lambda: TenantLimits(64, 16))
    metrics: Metrics = field(default_factory=Metrics)
    pending: PendingWrites = field(default_factory=PendingWrites)  # final writes waiting for storage to return
    sockets: set[WebSocket] = field(default_factory=set)  # the open Realtime connections
    # The responses running (or just ended) by conversation, with the events a reconnecting client missed.
    peers: Peers | None = None  # the other replicas sharing the PostgreSQL database (none with SQLite)
    live: LiveConversations = field(default_factory=lambda: LiveConversations(
        ReplayLimits(max_events=4096, max_bytes=1 << 20, max_total_bytes=64 << 20, grace_s=30.0)))

    @property
    def num_connections(self) -> int:
        return len(self.sockets)

    @property
    def is_loaded(self) -> bool:
        """Whether the model is loaded and the engine set (before that, only probes are served)."""
        return self.engine is not None

    async def close_connections(self, code: int, reason: str) -> None:
        """Close every open Realtime connection (1012 when the server shuts down)."""
        await asyncio.gather(*(_close(websocket, code, reason) for websocket in list(self.sockets)))


def asgi_app(app: App) -> Starlette:
    """The ASGI application: the Realtime socket, the HTTP API, the chat page, health, and 404 for the rest."""
    routes = [
        WebSocketRoute(REALTIME_PATH, _realtime),
        Route(REALTIME_PATH, _upgrade_required),
        *ops.routes(),
        *http_api.routes(),
        *conversations_api.routes(),
    ]
    middleware = [Middleware(Access, tenant_of=app.tenant_of, allowed_origins=app.allowed_origins),
                  Middleware(ops.WhileLoading, app=app)]
    if app.allowed_origins:  # other sites' pages may call the HTTP API: answer their browsers' CORS checks
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=["*"] if "*" in app.allowed_origins else sorted(app.allowed_origins),
            allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type", "OpenAI-Beta"],
            expose_headers=["X-Conversation-Id"], max_age=600))
    starlette = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})
    starlette.state.app = app
    return starlette


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
    tenant = tenant_of(websocket.scope)
    if app.num_connections >= app.max_connections:
        await websocket.accept()
        await websocket.close(1013, "too many connections, try again later")
        return
    if not app.limits.acquire_connection(tenant):
        await websocket.accept()
        await websocket.close(1013, "too many connections for this key, try again later")
        return
    app.sockets.add(websocket)
    try:
        await _serve_connection(app, websocket, tenant)
    finally:
        app.sockets.discard(websocket)
        app.limits.release_connection(tenant)


async def _serve_connection(app: App, websocket: WebSocket, tenant: str) -> None:
    offered = websocket.scope.get("subprotocols") or []
    # Browsers send ["realtime", "openai-insecure-api-key.KEY", ...]; answer "realtime".
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    writer = EventWriter(_dialect_of(websocket.headers, offered))
    conversation_id = websocket.query_params.get("conversation", "")
    # The SDKs send ?model=NAME; echoing it keeps clients that check session.model happy.
    model_name = websocket.query_params.get("model", "")[:MAX_MODEL_NAME_CHARS] or app.model_name
    last_event_id = websocket.query_params.get("last_event_id") or None  # extension: resume a response

    async def send(event: dict[str, Any]) -> None:
        if websocket.application_state != WebSocketState.CONNECTED:
            return  # the session notices through close(); nothing to tell a gone client
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_text(json.dumps(event, ensure_ascii=False))

    is_stored = bool(conversation_id)
    if conversation_id:  # another tenant's conversation is as unknown as one never made
        try:
            exists = await asyncio.to_thread(app.store.conversation_exists, conversation_id, tenant)
        except StorageUnavailable as exc:
            await send(writer.error(exc))
            await _close(websocket, 1013, "storage unavailable, try again later")
            return
        if not exists:
            error = ConversationNotFound(f"No conversation '{quote(conversation_id)}' is stored here.",
                                         param="conversation")
            await send(writer.error(error))
            await _close(websocket, 1008, "conversation not found")
            return
    else:
        conversation_id = new_conversation_id()  # stored with the first item or response, not before
    session = Session(store=app.store, pending=app.pending, engine=app.engine, conversation_id=conversation_id,
                      model_name=model_name, settings=app.defaults, image_budget=app.image_budget,
                      writer=writer, send=send, drain=app.drain, live=app.live, peers=app.peers,
                      renders_tools=app.renders_tools, tenant=tenant, is_conversation_stored=is_stored,
                      limits=app.limits)
    log.info("connection %s: conversation %s, tenant %s (%s)", session.id, conversation_id, tenant,
             writer.dialect.value)
    try:
        await session.start(last_event_id if is_stored else None)
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


class Server(uvicorn.Server):
    """uvicorn's server, started and stopped by its owner (signals are :func:`serve_forever`'s), that drains
    before it shuts down: uvicorn itself would close Realtime connections (1012) with their responses running."""

    def __init__(self, app: App, host: str, port: int) -> None:
        config = uvicorn.Config(
            asgi_app(app), host=host, port=port,
            http=QuickHeadH11Protocol,
            ws=functools.partial(BoundedWebSocketProtocol, send_timeout_s=app.send_timeout_s),
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
        self._upkeep: asyncio.Task[None] | None = None

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
        self._upkeep = asyncio.create_task(run_upkeep(self.app.store))  # heartbeat and recovery while serving
        if self.app.peers is not None:
            await self.app.peers.start()

    def close(self) -> None:
        """Begin the drain and shut down; called again while draining, stop waiting for the running responses."""
        if self.should_exit:
            self.app.drain.hurry()
        self.should_exit = True

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # new connections are refused while the running responses finish
        await self.app.drain.run()
        if self._upkeep is not None:  # heartbeats went on while the drain waited: nobody took these responses
            self._upkeep.cancel()
        if self.app.peers is not None:
            await self.app.peers.stop()
        await self.app.close_connections(1012, "server shutting down")
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
    if bad_request_filter not in uvicorn_log.filters:
        uvicorn_log.addFilter(bad_request_filter)
    server = Server(app, host, port)
    await server.start()
    return server


async def serve_forever(app: App, host: str, port: int, load: Callable[[], None] | None = None) -> None:
    """Listen, then ``load`` the model (probes answer meanwhile, the rest is 503 ``model_loading``), then serve
    until SIGINT/SIGTERM, drain (a second signal stops the waiting), close connections with 1012 and return.
    What ``load`` raises is raised here, once the server has stopped."""
    server = await start_server(app, host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.close)
    try:
        if load is not None and not await _loaded(load, server):
            await server.wait_closed()  # stopped while loading
            return
        scheme = "https" if app.ssl_context else "http"
        print(f"assistant: listening on {url_of(app, host, port)} and {scheme}://{host}:{port}/v1", flush=True)
        await server.wait_closed()
        log.info("shut down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _loaded(load: Callable[[], None], server: Server) -> bool:
    """Run ``load`` on a daemon thread (not the loop's executor, which asyncio.run would wait for on a signal);
    False when the server was told to stop first. A failure stops the server and is raised."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        error: BaseException | None = None
        try:
            load()
        except BaseException as exc:  # noqa: BLE001  handed to the loop, which raises it
            error = exc
        loop.call_soon_threadsafe(_settle, done, error)

    threading.Thread(target=run, name="assistant-load", daemon=True).start()
    stopped = asyncio.shield(server.wait_closed())  # cancelling our wait must not cancel the server
    await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if done.done() and done.exception() is not None:
        server.close()
        await stopped
        done.result()  # raises what loading raised
    if not done.done():
        return False
    stopped.cancel()
    return True


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
