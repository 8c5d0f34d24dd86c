"""REST for integrations, shaped like OpenAI's Conversations API and scoped to the caller's tenant.

- ``GET /v1/conversations?limit=&after=&order=``: the tenant's conversations, newest first by default;
- ``GET /v1/conversations/{id}``: one conversation (``{"id", "object": "conversation", "created_at", "metadata"}``);
- ``GET /v1/conversations/{id}/items?limit=&after=&order=&images=``: its items (newest first by default, as
  OpenAI's; ``order=asc`` for reading order), as Responses-style items: ``message`` with ``input_text`` /
  ``output_text`` / ``input_image`` parts, ``function_call``, ``function_call_output``. Images come as data
  URLs, or with ``images=reference`` as the URL of ``.../images/{sha256}`` (a page of large images stays small);
- ``GET /v1/conversations/{id}/images/{sha256}``: the bytes of an image of that conversation;
- ``DELETE /v1/conversations/{id}``: deletes it with its items and responses.

Lists are ``{"object": "list", "data", "first_id", "last_id", "has_more"}``; ``limit`` is 1-100 (default 20)
and ``after`` the last id of the previous page. Another tenant's conversation is as unknown as one that never
existed: 404 ``conversation_not_found``. Errors use the HTTP API's OpenAI error shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from assistant import images as image_codec
from assistant.access import tenant_of
from assistant.errors import AssistantError, InvalidValue, NotFound, quote
from assistant.http_api import error_response
from assistant.items import ContentPart, ConversationInfo, Item

if TYPE_CHECKING:
    from assistant.server import App

MAX_PAGE = 100
DEFAULT_PAGE = 20
PREFIX = "/v1/conversations"


def routes() -> list[Route]:
    return [
        Route(PREFIX, _coded(list_conversations), methods=["GET"]),
        Route(PREFIX + "/{conversation_id}", _coded(get_conversation), methods=["GET"]),
        Route(PREFIX + "/{conversation_id}", _coded(delete_conversation), methods=["DELETE"]),
        Route(PREFIX + "/{conversation_id}/items", _coded(list_items), methods=["GET"]),
        Route(PREFIX + "/{conversation_id}/images/{sha256}", _coded(get_image), methods=["GET"]),
    ]


def _coded(handler: Callable[[Request, App, str], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The handler with the app and the caller's tenant, and any coded error as OpenAI's error body."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, request.app.state.app, tenant_of(request.scope))
        except AssistantError as exc:
            return error_response(exc)

    return endpoint


async def list_conversations(request: Request, app: App, tenant: str) -> Response:
    limit, after, newest_first = _page(request)
    conversations, has_more = await asyncio.to_thread(
        app.store.list_conversations, tenant, limit=limit, after=after, newest_first=newest_first)
    return JSONResponse(_list([_conversation_json(c) for c in conversations], has_more))


async def get_conversation(request: Request, app: App, tenant: str) -> Response:
    conversation = await asyncio.to_thread(app.store.get_conversation, request.path_params["conversation_id"], tenant)
    return JSONResponse(_conversation_json(conversation))


async def delete_conversation(request: Request, app: App, tenant: str) -> Response:
    conversation_id = request.path_params["conversation_id"]
    await asyncio.to_thread(app.store.delete_conversation, conversation_id, tenant)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: Request, app: App, tenant: str) -> Response:
    conversation_id = request.path_params["conversation_id"]
    limit, after, newest_first = _page(request, newest_first_by_default=True)
    images = request.query_params.get("images", "data_url")
    if images not in ("data_url", "reference"):
        raise InvalidValue("'images' is 'data_url' or 'reference'.", param="images")

    def read() -> tuple[list[dict[str, Any]], bool]:
        app.store.get_conversation(conversation_id, tenant)  # 404 for an unknown or another tenant's
        items, has_more = app.store.page_items(conversation_id, limit=limit, after=after, newest_first=newest_first)
        if images == "reference":
            def url(sha256: str) -> str:
                return f"{PREFIX}/{conversation_id}/images/{sha256}"
        else:
            stored = app.store.get_images([h for item in items for h in item.image_hashes])
            urls = {sha256: image_codec.to_data_url(image) for sha256, image in stored.items()}

            def url(sha256: str) -> str:
                return urls.get(sha256, "")
        return [_item_json(item, url) for item in items], has_more

    data, has_more = await asyncio.to_thread(read)
    return JSONResponse(_list(data, has_more))


async def get_image(request: Request, app: App, tenant: str) -> Response:
    conversation_id, sha256 = request.path_params["conversation_id"], request.path_params["sha256"]

    def read() -> Response:
        app.store.get_conversation(conversation_id, tenant)
        # Only an image this conversation refers to: the bytes are stored once for all tenants.
        if sha256 not in {part.image_sha256 for part in app.store.image_parts(conversation_id)}:
            raise NotFound(f"No image '{quote(sha256)}' in this conversation.", param="sha256", code="image_not_found")
        image = app.store.get_image(sha256)
        if image is None:
            raise NotFound(f"No image '{quote(sha256)}'.", param="sha256", code="image_not_found")
        return Response(image.data, media_type=image.mime_type, headers={"Cache-Control": "private, max-age=86400"})

    return await asyncio.to_thread(read)


def _page(request: Request, *, newest_first_by_default: bool = True) -> tuple[int, str | None, bool]:
    query = request.query_params
    try:
        limit = int(query.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidValue(f"'limit' is a whole number from 1 to {MAX_PAGE}.", param="limit")
    order = query.get("order", "desc" if newest_first_by_default else "asc")
    if order not in ("asc", "desc"):
        raise InvalidValue("'order' is 'asc' or 'desc'.", param="order")
    return limit, query.get("after") or None, order == "desc"


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _conversation_json(conversation: ConversationInfo) -> dict[str, Any]:
    return {"id": conversation.id, "object": "conversation", "created_at": int(conversation.created_at.timestamp()),
            "metadata": conversation.metadata or {}}


def _item_json(item: Item, image_url: Callable[[str], str]) -> dict[str, Any]:
    if item.type == "function_call":
        return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments or "", "status": item.status}
    if item.type == "function_call_output":
        return {"type": "function_call_output", "id": item.id, "call_id": item.call_id, "output": item.output or "",
                "status": item.status}
    return {"type": "message", "id": item.id, "status": item.status, "role": item.role,
            "content": [_part_json(part, image_url) for part in item.content]}


def _part_json(part: ContentPart, image_url: Callable[[str], str]) -> dict[str, Any]:
    if part.is_image:
        assert part.image_sha256 is not None
        return {"type": "input_image", "image_url": image_url(part.image_sha256), "detail": part.detail}
    if part.type == "output_text":
        return {"type": "output_text", "text": part.text or "", "annotations": []}
    return {"type": "input_text", "text": part.text or ""}
