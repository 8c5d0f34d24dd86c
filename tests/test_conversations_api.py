"""REST for integrations (OpenAI's Conversations API shape), over real loopback sockets with the `openai` SDK's
``conversations`` resource, raw HTTP for what the SDK lacks, and Realtime sockets writing the conversations."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI
from PIL import Image
from websockets.asyncio.client import connect

from assistant.engine.model import ChatModel
from assistant.keys import Keys
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.test_server_images import data_url
from tests.vision_fixtures import load_tiny_llava_chat, make_image

TIMEOUT = 60


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
async def keyed(vision_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(vision_model, data_dir, temperature=0, auth="on") as running:
        yield running


def sdk(server: RunningServer, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=server.http_base, max_retries=0, timeout=TIMEOUT)


async def get(server: RunningServer, key: str, path: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.get(server.http_base + path, params=params, headers={"Authorization": f"Bearer {key}"})


async def new_conversation(server: RunningServer, key: str, text: str, image: Image.Image | None = None) -> str:
    """A conversation written over the socket: a user message (with an image) and a 3-token answer."""
    ws, session = await open_session(server, additional_headers={"Authorization": f"Bearer {key}"})
    event = user_item(text)
    if image is not None:
        event["item"]["content"].append({"type": "input_image", "image_url": data_url(image)})
    await send(ws, event)
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3}})
    await recv_until(ws, "response.done")
    await ws.close()
    return str(session["conversation_id"])


async def test_conversations_are_listed_paged_read_and_deleted_per_tenant(keyed: RunningServer) -> None:
    acme = Keys(keyed.app.store.engine).create("acme")[1]
    globex = Keys(keyed.app.store.engine).create("globex")[1]
    image = make_image(3)
    ids = [await new_conversation(keyed, acme, f"question {n}", image if n == 1 else None) for n in range(3)]
    theirs = await new_conversation(keyed, globex, "globex's own")

    # Newest first, two per page, then the rest; another tenant's never shows.
    first = (await get(keyed, acme, "/conversations", limit=2)).json()
    assert [c["id"] for c in first["data"]] == ids[:0:-1] and first["has_more"] and first["last_id"] == ids[1]
    rest = (await get(keyed, acme, "/conversations", limit=2, after=first["last_id"])).json()
    assert [c["id"] for c in rest["data"]] == ids[:1] and not rest["has_more"]
    assert [c["id"] for c in (await get(keyed, acme, "/conversations", order="asc")).json()["data"]] == ids
    assert [c["id"] for c in (await get(keyed, globex, "/conversations")).json()["data"]] == [theirs]

    client = sdk(keyed, acme)
    conversation = await client.conversations.retrieve(ids[1])
    assert (conversation.id, conversation.object, conversation.metadata) == (ids[1], "conversation", {})
    # Items in reading order through the SDK's own pager (one item per page: it follows has_more and after).
    items = [item async for item in client.conversations.items.list(ids[1], order="asc", limit=1)]
    assert [(item.type, item.role) for item in items] == [("message", "user"), ("message", "assistant")]
    user, answer = items
    assert user.content[0].type == "input_text" and user.content[0].text == "question 1"
    assert user.content[1].type == "input_image" and user.content[1].image_url == data_url(image)
    assert answer.content[0].type == "output_text" and answer.status in ("completed", "incomplete")
    newest = (await get(keyed, acme, f"/conversations/{ids[1]}/items")).json()
    assert [item["id"] for item in newest["data"]] == [answer.id, user.id]  # OpenAI's default order: newest first

    # By reference, the image is fetched from the conversation it belongs to.
    by_reference = (await get(keyed, acme, f"/conversations/{ids[1]}/items", order="asc", images="reference")).json()
    url = by_reference["data"][0]["content"][1]["image_url"]
    assert url.startswith(f"/v1/conversations/{ids[1]}/images/")
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        fetched = await http.get(f"http://127.0.0.1:{keyed.port}{url}", headers={"Authorization": f"Bearer {acme}"})
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(data_url(image).split(",", 1)[1])
    assert Image.open(io.BytesIO(fetched.content)).size == image.size
    image_path = url.removeprefix("/v1")
    for path in (image_path, image_path.replace(ids[1], ids[0])):  # another tenant; an image not in that conversation
        assert (await get(keyed, globex if path == image_path else acme, path)).status_code == 404

    # Another tenant gets exactly what an unknown id gets.
    for conversation_id in (ids[0], "conv_" + "0" * 24):
        for path in ("", "/items"):
            response = await get(keyed, globex, f"/conversations/{conversation_id}{path}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "conversation_not_found"
    with pytest.raises(openai.NotFoundError):
        await sdk(keyed, globex).conversations.delete(ids[0])

    deleted = await client.conversations.delete(ids[0])
    assert (deleted.id, deleted.deleted) == (ids[0], True)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(ids[0])
    ws = await connect(f"{keyed.realtime_url}?conversation={ids[0]}",
                        additional_headers={"Authorization": f"Bearer {acme}"})
    assert (await recv(ws))["error"]["code"] == "conversation_not_found"
    await ws.close()


async def test_bad_paging_gets_coded_errors(keyed: RunningServer) -> None:
    key = Keys(keyed.app.store.engine).create("acme")[1]
    conversation = await new_conversation(keyed, key, "hello")
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                          ({"order": "sideways"}, "order")):
        response = await get(keyed, key, "/conversations", **params)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    response = await get(keyed, key, f"/conversations/{conversation}/items", after="item_nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "item_not_found"
    response = await get(keyed, key, "/conversations", after="conv_nope")
    assert response.status_code == 404 and response.json()["error"]["param"] == "after"
    response = await get(keyed, key, f"/conversations/{conversation}/items", images="inline")
    assert response.status_code == 400 and response.json()["error"]["param"] == "images"
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        assert (await http.get(keyed.http_base + "/conversations")).status_code == 401
