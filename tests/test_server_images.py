"""Images over the wire: validation codes, budgets, storage once per hash, encoding once, the SDK."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from PIL import Image

from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.vision_fixtures import GRID, load_tiny_llava_chat, make_image

IMAGE_TOKENS = GRID * GRID  # CLIP tower, "default" select drops CLS: 4 x 4 patches


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
async def vision_server(vision_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(vision_model, data_dir, max_images_per_message=3,
                              max_images_per_conversation=4) as running:
        yield running


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_item(*urls: str, text: str = "What is this?", detail: str = "auto", **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
    content += [{"type": "input_image", "image_url": url, "detail": detail} for url in urls]
    return {"type": "conversation.item.create", **extra,
            "item": {"type": "message", "role": "user", "content": content}}


async def ask(ws: Any) -> dict[str, Any]:
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 3, "temperature": 0}})
    return (await recv_until(ws, "response.done"))[-1]["response"]


async def test_sdk_sends_text_and_image_and_streams(vision_server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="sk-unused", base_url=vision_server.http_base,
                         websocket_base_url=vision_server.ws_base)
    url = data_url(make_image(1))
    async with client.realtime.connect(model="tiny-llava") as conn:
        await conn.recv()
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Describe the picture."},
            {"type": "input_image", "image_url": url, "detail": "high"}]})
        added = await conn.recv()
        assert added.type == "conversation.item.added"
        await conn.response.create(response={"max_output_tokens": 4})  # type: ignore[typeddict-unknown-key]
        deltas, done = [], None
        while done is None:
            event = await asyncio.wait_for(conn.recv(), 60)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.done":
                done = event.response
        assert deltas and done.usage.input_token_details.image_tokens == IMAGE_TOKENS
        item_id = added.item.id
        await conn.conversation.item.retrieve(item_id=item_id)
        while (event := await asyncio.wait_for(conn.recv(), 60)).type != "conversation.item.retrieved":
            pass
        assert event.item.content[1].image_url == url  # stored as sent (a PNG), returned as a data URL


async def test_image_encoded_once_across_turns_and_conversations(vision_server: RunningServer) -> None:
    url = data_url(make_image(2))
    ws, _ = await open_session(vision_server)
    await send(ws, image_item(url))
    await recv_until(ws, "conversation.item.done")
    cached = []
    for turn in range(3):
        usage = (await ask(ws))["usage"]
        assert usage["input_token_details"]["image_tokens"] == IMAGE_TOKENS
        cached.append(usage["input_token_details"]["cached_tokens_details"]["image_tokens"])
        await send(ws, user_item(f"and turn {turn}"))
        await recv_until(ws, "conversation.item.done")
    assert cached == [0, IMAGE_TOKENS, IMAGE_TOKENS]
    other, _ = await open_session(vision_server)
    await send(other, image_item(url, text="Same picture, new conversation"))
    await recv_until(other, "conversation.item.done")
    usage = (await ask(other))["usage"]
    assert usage["input_token_details"]["cached_tokens_details"]["image_tokens"] == IMAGE_TOKENS
    # the same system prompt and image start the first conversation's prompts: their KV cache is reused too
    assert usage["input_token_details"]["cached_tokens"] > IMAGE_TOKENS
    await ws.close()
    await other.close()


async def test_low_detail_costs_fewer_tokens(vision_server: RunningServer) -> None:
    ws, _ = await open_session(vision_server)
    await send(ws, image_item(data_url(make_image(3)), detail="low"))
    await recv_until(ws, "conversation.item.done")
    low = (await ask(ws))["usage"]["input_token_details"]["image_tokens"]
    assert 0 < low < IMAGE_TOKENS
    await ws.close()


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


NOISE_PNG = png_bytes((64, 64))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
HOSTILE = [
    ("data:image/png;base64,!!!not-base64!!!", "image_invalid_base64"),
    (f"data:image/png;base64,{b64(NOISE_PNG[: len(NOISE_PNG) // 2])}", "image_truncated"),
    (f"data:image/svg+xml;base64,{b64(SVG)}", "image_unsupported_format"),
    (f"data:image/png;base64,{b64(SVG)}", "image_unsupported_format"),
    ("https://example.com/cat.png", "image_remote_url_refused"),
    ("file:///etc/passwd", "image_invalid_url"),
    (f"data:image/png;base64,{b64(png_bytes((200, 200)))}", "image_too_many_pixels"),
]


@pytest.mark.parametrize("url, code", HOSTILE)
async def test_hostile_images_get_codes_and_store_nothing(vision_model: ChatModel, data_dir: Path,
                                                          url: str, code: str) -> None:
    async with running_server(vision_model, data_dir, max_image_pixels=36_000_000 // 1000) as server:
        ws, session = await open_session(server)
        await send(ws, {**user_item("kept"), "event_id": "ok"})
        await recv_until(ws, "conversation.item.done")
        await send(ws, image_item(data_url(make_image(4)), url, event_id="bad"))
        error = await recv(ws)
        assert error["type"] == "error"
        assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (
            code, "item.content[2].image_url", "bad")
        assert [i.text for i in server.app.store.list_items(session["conversation_id"])] == ["kept"]
        assert (await ask(ws))["status"] in ("completed", "incomplete")  # still usable
        await ws.close()


async def test_too_large_image_bytes(vision_model: ChatModel, data_dir: Path) -> None:
    async with running_server(vision_model, data_dir, max_image_bytes=1000) as server:
        ws, _ = await open_session(server)
        big = Image.effect_noise((64, 64), 100).convert("RGB")
        await send(ws, image_item(data_url(big)))
        error = await recv(ws)
        assert error["error"]["code"] == "image_too_large"
        assert error["error"]["param"] == "item.content[1].image_url"
        await ws.close()


async def test_image_budgets(vision_server: RunningServer) -> None:
    ws, session = await open_session(vision_server)
    urls = [data_url(make_image(10 + i)) for i in range(4)]
    await send(ws, image_item(*urls))  # 4 > max_images_per_message=3
    assert (await recv(ws))["error"]["code"] == "too_many_images"
    for url in urls[:3]:
        await send(ws, image_item(url))
        await recv_until(ws, "conversation.item.done")
    await send(ws, image_item(urls[3], urls[0]))  # 3 stored + 2 > max_images_per_conversation=4
    error = await recv(ws)
    assert error["error"]["code"] == "too_many_images" and error["error"]["param"] == "item.content"
    assert len(vision_server.app.store.list_items(session["conversation_id"])) == 3
    await ws.close()


async def test_image_token_budget(vision_model: ChatModel, data_dir: Path) -> None:
    async with running_server(vision_model, data_dir, max_image_tokens_per_message=IMAGE_TOKENS + 1) as server:
        ws, _ = await open_session(server)
        await send(ws, image_item(data_url(make_image(20)), data_url(make_image(21))))
        assert (await recv(ws))["error"]["code"] == "too_many_image_tokens"
        await send(ws, image_item(data_url(make_image(20)), data_url(make_image(21)), detail="low"))
        assert (await recv(ws))["type"] == "conversation.item.added"
        await ws.close()


async def test_text_only_model_refuses_images(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, image_item(data_url(make_image(5))))
    error = await recv(ws)
    assert error["error"]["code"] == "image_input_not_supported"
    assert error["error"]["param"] == "item.content[1]"  # the image part, after the text part
    await ws.close()


async def test_images_stored_once_and_survive_restart(vision_model: ChatModel, data_dir: Path) -> None:
    url = data_url(make_image(6), "JPEG")
    async with running_server(vision_model, data_dir) as first:
        ws, session = await open_session(first)
        for name in ("a", "b"):
            await send(ws, {**image_item(url), "item": {**image_item(url)["item"], "id": f"img_{name}"}})
            await recv_until(ws, "conversation.item.done")
        items = first.app.store.list_items(session["conversation_id"])
        assert items[0].image_hashes == items[1].image_hashes
        with first.app.store.engine.connect() as connection:
            from sqlalchemy import text

            assert connection.execute(text("select count(*) from images")).scalar() == 1
        await ws.close()
    async with running_server(vision_model, data_dir) as second:
        ws, _ = await open_session(second, f"?conversation={session['conversation_id']}")
        await send(ws, {"type": "conversation.item.retrieve", "item_id": "img_b"})
        item = (await recv(ws))["item"]
        assert item["content"][1]["image_url"] == url
        usage = (await ask(ws))["usage"]
        assert usage["input_token_details"]["image_tokens"] == 2 * IMAGE_TOKENS
        await ws.close()


