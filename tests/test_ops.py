"""Operations endpoints over real loopback sockets: /healthz, /readyz (engine and database), /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from assistant.app import close_app, load_engine, open_app
from assistant.config import load_config
from assistant.server import serve_forever

from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server
from tests.process_fixtures import free_port
from tests.test_server import open_session, recv_until, send, user_item
from tests.test_server_images import data_url
from tests.vision_fixtures import load_tiny_llava_chat, make_image

TIMEOUT = 60


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"))


async def get(server: RunningServer, path: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.get(f"http://127.0.0.1:{server.port}{path}", headers=headers)


async def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await get(server, "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


async def test_health_and_readiness(server: RunningServer) -> None:
    assert ((await get(server, "/healthz")).status_code, (await get(server, "/readyz")).text) == (200, "ready\n")
    # The database goes away (an unreachable PostgreSQL): not ready, and says which part.
    store = server.app.store
    reachable = store.engine
    store.engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        response = await get(server, "/readyz")
        assert response.status_code == 503 and "database" in response.text and "engine" not in response.text
    finally:
        store.engine.dispose()
        store.engine = reachable
    assert (await get(server, "/readyz")).status_code == 200
    server.app.engine.shutdown()  # the model is gone: not ready
    response = await get(server, "/readyz")
    assert response.status_code == 503 and "engine" in response.text


async def test_probes_are_open_and_metrics_need_a_key(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, auth="on") as srv:
        assert (await get(srv, "/healthz")).status_code == 200 and (await get(srv, "/readyz")).status_code == 200
        assert (await get(srv, "/metrics")).status_code == 401


async def test_metrics_count_what_users_feel(vision_model: ChatModel, data_dir: Path) -> None:
    async with running_server(vision_model, data_dir, temperature=0) as srv:
        before = await scrape(srv)
        assert before[("assistant_open_connections", ())] == 0
        ws, _ = await open_session(srv)
        event = user_item("What is this?")
        event["item"]["content"].append({"type": "input_image", "image_url": data_url(make_image(1))})
        await send(ws, event)
        await recv_until(ws, "conversation.item.done")
        usages = []
        for _ in range(2):  # the second turn reuses the first one's KV cache and image embeddings
            await send(ws, {"type": "response.create", "response": {"max_output_tokens": 5}})
            done = (await recv_until(ws, "response.done"))[-1]["response"]
            usages.append(done["usage"])
        after = await scrape(srv)
        assert after[("assistant_open_connections", ())] == 1
        await ws.close()
    statuses = {labels: value for (name, labels), value in after.items() if name == "assistant_responses_total"}
    assert sum(statuses.values()) == 2
    output = sum(usage["output_tokens"] for usage in usages)
    assert after[("assistant_tokens_total", (("direction", "output"),))] == output
    assert after[("assistant_tokens_total", (("direction", "input"),))] == sum(u["input_tokens"] for u in usages)
    assert after[("assistant_time_to_first_token_seconds_count", ())] == 2
    # Every token after each response's first text (a first delta may hold several tokens).
    assert 0 < after[("assistant_inter_token_latency_seconds_count", ())] <= output - 2
    assert after[("assistant_image_encode_seconds_count", ())] == 1  # encoded once, cached the second time
    cached = usages[1]["input_token_details"]["cached_tokens"]
    assert cached > 0 and after[("assistant_kv_cache_hit_tokens_total", ())] == cached
    image_tokens = usages[0]["input_token_details"]["image_tokens"]
    assert after[("assistant_image_tokens_total", (("cached", "false"),))] == image_tokens
    assert after[("assistant_image_tokens_total", (("cached", "true"),))] == image_tokens
    assert ("assistant_queue_depth", ()) in after and ("assistant_running_batch_size", ()) in after


async def test_probes_answer_while_the_model_loads_and_the_rest_waits(tiny_model: ChatModel, data_dir: Path) -> None:
    port = free_port()
    config = load_config({"data_dir": str(data_dir), "port": str(port)}, env={})
    app = open_app(config, progress=lambda _: None)
    may_load = threading.Event()

    def load() -> None:
        assert may_load.wait(60)
        load_engine(app, config, lambda _: None, tiny_model)

    serving = asyncio.create_task(serve_forever(app, "127.0.0.1", port, load))
    server = RunningServer(app, port)
    try:
        for _ in range(100):
            try:
                if (await get(server, "/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        response = await get(server, "/readyz")
        assert (response.status_code, response.text) == (503, "not ready: loading the model\n")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            completion = await http.post(server.http_base + "/chat/completions", json={"model": "m", "messages": []})
        assert completion.status_code == 503 and completion.json()["error"]["code"] == "model_loading"
        assert completion.headers["retry-after"] == "5"
        with pytest.raises(InvalidStatus) as caught:
            await connect(server.realtime_url)
        assert caught.value.response.status_code == 503
        may_load.set()
        for _ in range(200):
            if (await get(server, "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        ws, _ = await open_session(server)
        await send(ws, user_item("Hello"))
        await recv_until(ws, "conversation.item.done")
        await ws.close()
    finally:
        may_load.set()
        os.kill(os.getpid(), signal.SIGTERM)  # serve_forever's own way to stop
        await asyncio.wait_for(serving, 30)
        close_app(app)


async def test_a_model_that_fails_to_load_stops_the_server_with_its_error(data_dir: Path) -> None:
    port = free_port()
    config = load_config({"data_dir": str(data_dir), "port": str(port)}, env={})
    app = open_app(config, progress=lambda _: None)

    def load() -> None:
        raise RuntimeError("cannot load the model: no such directory")

    try:
        with pytest.raises(RuntimeError, match="no such directory"):
            await asyncio.wait_for(serve_forever(app, "127.0.0.1", port, load), 30)
        with pytest.raises(httpx.TransportError):  # the port is closed again
            await get(RunningServer(app, port), "/healthz")
    finally:
        close_app(app)
