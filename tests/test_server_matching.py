"""``image.match`` over real loopback sockets with raw websockets clients: results, codes, nothing stored."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from assistant.engine.matching import match
from assistant.engine.model import ChatModel
from assistant.prompts import load_system_prompt
from tests.conftest import RunningServer, running_server
from tests.matching_fixtures import (CAPTIONS, NUM_IMAGE_TOKENS, bag_of_words_chat_model, save_bag_of_words_model,
                                     solid_png)
from tests.test_server import open_session, recv, recv_until, send, user_item
from tests.test_server_images import HOSTILE

RED = f"data:image/png;base64,{base64.b64encode(solid_png((255, 0, 0))).decode()}"
TEXTS = [*CAPTIONS.values(), "a dog"]


@pytest.fixture(scope="module")
def seeing(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    """It sees a solid red image as "a red square" (tests.matching_fixtures)."""
    return bag_of_words_chat_model(save_bag_of_words_model(tmp_path_factory.mktemp("bow")))


@pytest.fixture
async def seeing_server(seeing: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(seeing, data_dir) as running:
        yield running


def match_event(image_url: str = RED, texts: list[str] = TEXTS, **extra: Any) -> dict[str, Any]:
    return {"type": "image.match", "image": {"image_url": image_url}, "texts": texts, **extra}


async def test_image_match_ranks_the_true_caption_first_and_stores_nothing(seeing_server: RunningServer,
                                                                           seeing: ChatModel) -> None:
    ws, session = await open_session(seeing_server)
    await send(ws, match_event(event_id="m1"))
    result = await recv(ws)
    assert result["type"] == "image.match.result" and result["client_event_id"] == "m1"
    assert result["event_id"].startswith("event_") and result["scoring"] == "likelihood"
    scores = result["scores"]
    assert [(s["index"], s["text"]) for s in scores] == list(enumerate(TEXTS))
    assert TEXTS[result["ranking"][0]] == "a red square"
    assert [scores[i]["score"] for i in result["ranking"]] == sorted((s["score"] for s in scores), reverse=True)
    for s in scores:
        assert s["score"] == pytest.approx(s["log_likelihood"] / s["num_tokens"])
        assert s["num_tokens"] > 0
    # The session's instructions are the system message: the server agrees with the Python API.
    expected = {s.index: s.score for s in match(seeing, solid_png((255, 0, 0)), TEXTS,
                                                instructions=load_system_prompt())}
    assert [s["score"] for s in scores] == pytest.approx([expected[i] for i in range(len(TEXTS))], abs=1e-4)
    assert seeing_server.app.store.list_items(session["conversation_id"]) == []
    with seeing_server.app.store.engine.connect() as connection:
        assert connection.execute(text("select count(*) from images")).scalar() == 0
    await ws.close()


async def test_image_match_takes_a_prompt_a_scoring_and_the_session_instructions(seeing_server: RunningServer,
                                                                                   seeing: ChatModel) -> None:
    ws, _ = await open_session(seeing_server)
    await send(ws, {"type": "session.update", "session": {"instructions": ""}})
    await recv_until(ws, "session.updated")
    await send(ws, match_event(prompt="What colour is it?", scoring="gain"))
    result = await recv(ws)
    scores = result["scores"]
    assert result["scoring"] == "gain"
    for s in scores:
        assert s["score"] == pytest.approx(s["log_likelihood"] - s["log_likelihood_without_image"])
    expected = match(seeing, solid_png((255, 0, 0)), TEXTS, "What colour is it?", instructions="", scoring="gain")
    assert [s["score"] for s in scores] == pytest.approx([e.score for e in sorted(expected, key=lambda e: e.index)],
                                                         abs=1e-4)
    await ws.close()


@pytest.mark.parametrize("url, code", HOSTILE)
async def test_a_bad_image_gets_the_image_codes_and_the_connection_stays_useful(seeing: ChatModel, data_dir: Path,
                                                                               url: str, code: str) -> None:
    async with running_server(seeing, data_dir, max_image_pixels=36_000) as server:  # the 200 x 200 one is too many
        ws, _ = await open_session(server)
        await send(ws, match_event(url, event_id="bad"))
        error = (await recv(ws))["error"]
        assert (error["code"], error["param"], error["event_id"]) == (code, "image.image_url", "bad")
        await send(ws, match_event())
        assert (await recv(ws))["type"] == "image.match.result"
        await ws.close()


async def test_too_many_or_too_long_texts_are_refused(seeing_server: RunningServer) -> None:
    ws, _ = await open_session(seeing_server)
    await send(ws, match_event(texts=["a red square"] * 17, event_id="many"))
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "texts", "many")
    await send(ws, match_event(texts=["ok", "x" * 1001]))
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "texts[1]")
    await send(ws, match_event(texts=["ok", "你好世界" * 250], event_id="long"))  # over this model's 1,024 positions
    error = (await recv(ws))["error"]
    assert (error["code"], error["type"], error["event_id"]) == ("context_length_exceeded", "invalid_request_error",
                                                                 "long")
    await send(ws, match_event(texts=["ok"]))
    assert (await recv(ws))["type"] == "image.match.result"
    await ws.close()


async def test_an_image_over_the_token_budget_is_refused(seeing: ChatModel, data_dir: Path) -> None:
    async with running_server(seeing, data_dir, max_image_tokens_per_message=NUM_IMAGE_TOKENS - 1) as server:
        ws, _ = await open_session(server)
        await send(ws, match_event())
        error = (await recv(ws))["error"]
        assert (error["code"], error["param"]) == ("too_many_image_tokens", "image.detail")
        await ws.close()


async def test_a_text_only_model_answers_image_input_not_supported(server: RunningServer) -> None:
    ws, _ = await open_session(server)
    await send(ws, match_event(event_id="t"))
    error = (await recv(ws))["error"]
    assert (error["code"], error["param"], error["event_id"]) == ("image_input_not_supported", "image", "t")
    await ws.close()


async def test_image_match_runs_beside_a_response(seeing_server: RunningServer) -> None:
    ws, _ = await open_session(seeing_server)
    await send(ws, user_item("Hello"))
    await recv_until(ws, "conversation.item.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 30, "temperature": 0}})
    await recv_until(ws, "response.created")
    await send(ws, match_event(event_id="during"))
    events = await recv_until(ws, "image.match.result")
    assert events[-1]["client_event_id"] == "during"
    if not any(e["type"] == "response.done" for e in events):
        await recv_until(ws, "response.done")
    await send(ws, {"type": "response.create", "response": {"max_output_tokens": 1}})  # not blocked by the match
    assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    await ws.close()
