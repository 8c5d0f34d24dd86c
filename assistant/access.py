"""Who may use the server: browser origins, then keys. An ASGI middleware in front of every route.

Order of the checks, before any route runs (so a refused client costs one key lookup at most):

1. ``/healthz`` and ``/readyz`` (load balancers and probes carry no key) and the chat page, ``/`` and its
   static files under ``/web/`` (they hold no data: the page asks for a key and sends it itself), are open
   to all; ``/metrics`` needs a key like the API when keys are required.
2. **Origin.** A request or WebSocket handshake that carries an ``Origin`` header comes from a
   browser page. It passes when that origin is the server's own (same host and port as the
   ``Host`` header) or is listed in ``--allowed-origins`` (``*`` for any); otherwise it is refused
   with 403 ``origin_not_allowed``. This is what stops cross-site WebSocket hijacking: a page on
   another site could otherwise drive the server from a visitor's browser, which would present
   the visitor's network position (and, for the HTTP API, nothing else is needed). Clients that
   send no ``Origin`` (the SDKs, servers, curl) are not browsers and pass.
3. **Key.** With keys required, the key comes from ``Authorization: Bearer KEY`` (the ``openai``
   SDKs' ``api_key``) or, from browsers, which cannot set headers on a WebSocket, from the
   ``openai-insecure-api-key.KEY`` subprotocol. No key: 401 ``missing_api_key``; an unknown or
   revoked one: 401 ``invalid_api_key``, OpenAI's error body in both cases (on a WebSocket, as the
   handshake's HTTP answer). CORS preflights (``OPTIONS``) carry no key by design and do no work.
   The key's tenant is put in the ASGI scope's state (``tenant``); without keys it is ``default``.

Refusals are logged at INFO with the client address, path and code, never with the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from assistant.config import is_loopback
from assistant.errors import AssistantError, OriginNotAllowed, Unauthorized, quote
from assistant.store_models import DEFAULT_TENANT

log = logging.getLogger(__name__)
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})  # probes carry no key; the page holds no data
OPEN_PATH_PREFIX = "/web/"  # the page's files (assistant/web); StaticFiles refuses paths that leave its folder
HTTP_STATUS = {"missing_api_key": 401, "invalid_api_key": 401, "origin_not_allowed": 403,
               "storage_unavailable": 503}  # the key could not be looked up


class Access:
    """The gate: ``tenant_of(key)`` (a blocking lookup, run in a worker thread) returns the key's tenant or None;
    ``tenant_of=None`` means no keys are required."""

    def __init__(self, app: ASGIApp, *, tenant_of: Callable[[str], str | None] | None,
                 allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.tenant_of = tenant_of
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            origin = headers.get("origin")
            if origin is not None and not self.is_origin_allowed(origin, headers.get("host", "")):
                raise OriginNotAllowed(f"Pages from '{quote(origin)}' may not use this server; its operator can "
                                       "allow them with --allowed-origins.")
            tenant = DEFAULT_TENANT
            if self.tenant_of is not None and not (scope["type"] == "http" and scope["method"] == "OPTIONS"):
                tenant = await self._authenticate(scope, headers)
        except AssistantError as exc:
            client = scope.get("client") or ("?", 0)
            log.info("refused %s %s from %s: %s", "WebSocket" if scope["type"] == "websocket" else scope["method"],
                     scope["path"], client[0], exc.code)
            await _refuse(scope, receive, send, exc)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def is_origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        # The server's own pages: same host and port as the request was sent to (the scheme is left out,
        # so a TLS-terminating proxy in front does not make the server's own page cross-origin).
        return bool(netloc) and netloc == host.strip().lower()

    async def _authenticate(self, scope: Scope, headers: Headers) -> str:
        assert self.tenant_of is not None
        key = _key_of(scope, headers)
        if not key:
            raise Unauthorized("This server requires an API key: send 'Authorization: Bearer KEY' (the SDKs' "
                               "api_key), or from a browser the subprotocol 'openai-insecure-api-key.KEY'.",
                               code="missing_api_key")
        tenant = await asyncio.to_thread(self.tenant_of, key)
        if tenant is None:
            raise Unauthorized("Incorrect API key provided: it is unknown or revoked.")
        return tenant


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PATH_PREFIX)


def requires_keys(auth: str, host: str, has_keys: bool) -> bool:
    """``--auth``: 'on' always; 'auto' unless the server is reachable from this machine only and no key exists
    ('off' on a non-loopback host is refused when the config is read)."""
    return auth == "on" or (auth == "auto" and (has_keys or not is_loopback(host)))


def tenant_of(scope: Scope) -> str:
    """The tenant :class:`Access` admitted this request or connection for."""
    return str(scope.get("state", {}).get("tenant", DEFAULT_TENANT))


def _key_of(scope: Scope, headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scope["type"] == "websocket":
        for subprotocol in scope.get("subprotocols") or ():
            if subprotocol.startswith(KEY_SUBPROTOCOL_PREFIX):
                return subprotocol[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: AssistantError) -> None:
    body = {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
    await answer_before_routing(scope, receive, send, JSONResponse(
        body, status_code=HTTP_STATUS[error.code],
        headers={"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthorized) else None))


async def answer_before_routing(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Answer a request with ``response`` from a middleware: as itself over HTTP, as the handshake's refusal on a
    WebSocket (uvicorn's denial-response extension)."""
    if scope["type"] == "websocket":
        await WebSocket(scope, receive, send).send_denial_response(response)
    else:
        await response(scope, receive, send)
