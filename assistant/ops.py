"""Operations and the page: ``/healthz``, ``/readyz``, ``/metrics``, ``/`` and ``/web/``, and the gate that
serves only those while the model loads.

- ``GET /healthz`` answers 200 ``ok`` while the process is up;
- ``GET /readyz`` 200 ``ready`` when the engine runs (the model is loaded) and the database answers a
  ``SELECT 1`` within :data:`READY_TIMEOUT_S`, otherwise 503 saying which is not;
- ``GET /metrics`` is Prometheus text (:mod:`assistant.metrics`);
- ``GET /`` is the chat page (``assistant/web``: plain HTML, CSS and JavaScript, no build step), its files
  under ``/web/``, served with a Content-Security-Policy that allows only its own files and server.

Until the model is loaded (:class:`WhileLoading`), every other route answers 503 ``model_loading``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from assistant.access import answer_before_routing, is_open
from assistant.http_api import error_body

if TYPE_CHECKING:
    from assistant.server import App

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 2.0  # a database slower than this to answer SELECT 1 is not ready
WEB_DIR = Path(__file__).parent / "web"
# The page loads only its own files and talks only to its own server ('self' covers ws:/wss: to the same host);
# it may not be framed (clickjacking) and never renders HTML from the wire.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", _healthz),
        Route("/readyz", _readyz),
        Route("/metrics", _metrics),
        Route("/", _page),
        Mount("/web", StaticFiles(directory=WEB_DIR), name="web"),
    ]


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def _page(request: Request) -> Response:
    return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


async def _readyz(request: Request) -> Response:
    """Ready to serve: the engine thread runs (the model is loaded) and the database answers."""
    app: App = request.app.state.app
    if not app.is_loaded:
        problems = ["loading the model"]
    else:
        problems = [] if app.engine.is_running else ["the engine is not running"]
    try:
        await asyncio.wait_for(asyncio.to_thread(app.store.ping), READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001  any failure means not ready; the reason is logged, not sent
        log.info("readyz: the database did not answer: %s", type(exc).__name__)
        problems.append("the database does not answer")
    if problems:
        return PlainTextResponse("not ready: " + "; ".join(problems) + "\n", status_code=503)
    return PlainTextResponse("ready\n")


class WhileLoading:
    """Until the model is loaded, everything but the probes and metrics is 503 ``model_loading`` (retryable),
    on the HTTP API and at the WebSocket handshake alike."""

    def __init__(self, asgi: ASGIApp, app: App) -> None:
        self.asgi = asgi
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app.is_loaded or scope["type"] not in ("http", "websocket") or is_served_while_loading(scope["path"]):
            await self.asgi(scope, receive, send)
            return
        body = error_body("The model is still loading; retry in a few seconds.", "server_error", "model_loading")
        await answer_before_routing(scope, receive, send,
                                    JSONResponse(body, status_code=503, headers={"Retry-After": "5"}))


def is_served_while_loading(path: str) -> bool:
    """The probes, the metrics and the page (what needs no key: :func:`assistant.access.is_open`)."""
    return is_open(path) or path == "/metrics"


async def _metrics(request: Request) -> Response:
    app: App = request.app.state.app
    return Response(app.metrics.render(), media_type=CONTENT_TYPE_LATEST)
