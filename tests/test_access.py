"""Keys, tenants, origins and per-tenant bounds, over real loopback sockets with the `openai` SDK and raw
`websockets` clients (a browser's handshake is a raw one with an Origin header and subprotocols)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RateLimitsUpdatedEvent
from sqlalchemy import func, select
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from assistant.access import requires_keys
from assistant.config import ConfigError, load_config
from assistant.engine.model import ChatModel
from assistant.keys import Keys
from assistant.store_models import ConversationRow
from tests.conftest import RunningServer, running_server
from tests.test_server import open_session, recv, recv_until, send, user_item

TIMEOUT = 60
QUESTION = [{"role": "user", "content": "Say something."}]


@pytest.fixture
async def keyed(tiny_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tiny_model, data_dir, temperature=0, auth="on") as running:
        yield running


def new_key(server: RunningServer, tenant: str) -> str:
    return Keys(server.app.store.engine).create(tenant)[1]


def bearer(key: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {key}"}}


async def refused(server: RunningServer, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body a refused WebSocket handshake got."""
    with pytest.raises(InvalidStatus) as caught:
        await connect(server.realtime_url, **kwargs)
    response = caught.value.response
    return response.status_code, json.loads(response.body or b"{}")


# ---------------------------------------------------------------- the auth decision


def test_keys_are_required_off_loopback_and_once_any_exists() -> None:
    assert not requires_keys("auto", "127.0.0.1", has_keys=False)
    assert not requires_keys("auto", "::1", has_keys=False) and not requires_keys("auto", "localhost", False)
    assert requires_keys("auto", "127.0.0.1", has_keys=True)
    assert requires_keys("auto", "0.0.0.0", has_keys=False) and requires_keys("auto", "", has_keys=False)
    assert requires_keys("auto", "192.168.1.5", has_keys=False) and requires_keys("auto", "example.com", False)
    assert requires_keys("on", "127.0.0.1", has_keys=False)
    assert not requires_keys("off", "127.0.0.1", has_keys=True)
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_config({"auth": "off", "host": "0.0.0.0"}, env={})


# ---------------------------------------------------------------- keys on the socket and the HTTP API


async def test_a_missing_wrong_or_revoked_key_is_refused_at_the_handshake(keyed: RunningServer,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    status, body = await refused(keyed)
    assert status == 401 and {**body["error"], "message": ""} == {
        "message": "", "type": "invalid_request_error", "param": None, "code": "missing_api_key"}
    assert "Authorization: Bearer" in body["error"]["message"]
    wrong = "sk-asst-" + "x" * 43
    status, body = await refused(keyed, **bearer(wrong))
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    key = new_key(keyed, "acme")
    Keys(keyed.app.store.engine).revoke(Keys(keyed.app.store.engine).list()[0].id)
    status, body = await refused(keyed, **bearer(key))
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert keyed.app.num_connections == 0
    # Logged with the code and the client's address, never with a key.
    lines = [record.getMessage() for record in caplog.records]
    assert any("refused WebSocket /v1/realtime" in line and "invalid_api_key" in line for line in lines)
    assert not any(wrong in line or key in line or key[12:] in line for line in lines)


async def test_a_valid_key_opens_the_socket_as_header_or_browser_subprotocol(keyed: RunningServer) -> None:
    key = new_key(keyed, "acme")
    ws, session = await open_session(keyed, **bearer(key))
    await send(ws, user_item("Hello"))
    assert (await recv_until(ws, "conversation.item.done"))[-1]["item"]["content"][0]["text"] == "Hello"
    await ws.close()
    # A browser cannot set headers on a WebSocket: the key travels as a subprotocol, the server answers "realtime".
    ws, _ = await open_session(keyed, subprotocols=["realtime", f"openai-insecure-api-key.{key}"])  # type: ignore[list-item]
    assert ws.subprotocol == "realtime"
    await ws.close()


async def test_the_http_api_answers_401_in_openais_shape(keyed: RunningServer) -> None:
    for api_key in ("sk-unknown", "sk-asst-" + "y" * 43):
        client = AsyncOpenAI(api_key=api_key, base_url=keyed.http_base, max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="m", messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.get(keyed.http_base + "/models")
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
        assert (await http.get(f"http://127.0.0.1:{keyed.port}/healthz")).status_code == 200  # probes carry no key
    client = AsyncOpenAI(api_key=new_key(keyed, "acme"), base_url=keyed.http_base, max_retries=0, timeout=TIMEOUT)
    completion = await client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    assert completion.choices[0].message.role == "assistant"


# ---------------------------------------------------------------- tenants


async def test_another_tenants_conversation_is_as_unknown_as_a_made_up_one(keyed: RunningServer) -> None:
    acme, globex = new_key(keyed, "acme"), new_key(keyed, "globex")
    ws, session = await open_session(keyed, **bearer(acme))
    await send(ws, user_item("acme's secret"))
    await recv_until(ws, "conversation.item.done")
    await ws.close()
    mine = session["conversation_id"]
    answers = []
    for conversation in (mine, "conv_" + "0" * 24):
        ws = await connect(f"{keyed.realtime_url}?conversation={conversation}", **bearer(globex))
        error = await recv(ws)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
        answers.append((error["error"]["code"], error["error"]["message"].replace(conversation, "ID")))
    assert answers[0] == answers[1] == ("conversation_not_found", "No conversation 'ID' is stored here.")
    # Its owner resumes it.
    ws, session = await open_session(keyed, f"?conversation={mine}", **bearer(acme))
    await send(ws, {"type": "conversation.item.retrieve", "item_id": "nope"})
    assert (await recv(ws))["error"]["code"] == "item_not_found"
    await ws.close()


async def test_conversations_stored_through_the_http_api_belong_to_the_keys_tenant(keyed: RunningServer) -> None:
    acme, globex = new_key(keyed, "acme"), new_key(keyed, "globex")
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.post(keyed.http_base + "/chat/completions", headers={"Authorization": f"Bearer {acme}"},
                                   json={"model": "m", "messages": QUESTION, "max_tokens": 3, "store": True})
    conversation = response.headers["X-Conversation-Id"]
    assert keyed.app.store.conversation_exists(conversation, "acme")
    ws = await connect(f"{keyed.realtime_url}?conversation={conversation}", **bearer(globex))
    assert (await recv(ws))["error"]["code"] == "conversation_not_found"
    await ws.close()
    ws, _ = await open_session(keyed, f"?conversation={conversation}", **bearer(acme))
    await ws.close()


async def test_a_connection_that_sends_nothing_stores_no_conversation(server: RunningServer) -> None:
    def num_conversations() -> int:
        with server.app.store.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(ConversationRow)) or 0

    for _ in range(3):
        ws, session = await open_session(server)
        await send(ws, {"type": "conversation.item.delete", "item_id": "item_x"})
        assert (await recv(ws))["error"]["code"] == "item_not_found"
        await ws.close()
    assert num_conversations() == 0
    ws, session = await open_session(server)
    await send(ws, user_item("now it exists"))
    await recv_until(ws, "conversation.item.done")
    await ws.close()
    assert num_conversations() == 1 and server.app.store.conversation_exists(session["conversation_id"], "default")


# ---------------------------------------------------------------- browser origins


async def test_pages_from_other_sites_are_refused_on_every_route(server: RunningServer) -> None:
    evil = {"Origin": "https://evil.example"}
    status, body = await refused(server, additional_headers=evil)
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.post(server.http_base + "/chat/completions", headers=evil,
                                   content=json.dumps({"model": "m", "messages": QUESTION}))
        assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
        for origin in ("null", "http://127.0.0.1.evil.example", f"http://localhost:{server.port}", "garbage"):
            response = await http.get(server.http_base + "/models", headers={"Origin": origin})
            assert response.status_code == 403, origin
        # The server's own page (same host and port) and clients that send no Origin are welcome.
        own = {"Origin": f"http://127.0.0.1:{server.port}"}
        assert (await http.get(server.http_base + "/models", headers=own)).status_code == 200
        assert (await http.get(server.http_base + "/models")).status_code == 200
    ws, _ = await open_session(server, additional_headers={"Origin": f"http://127.0.0.1:{server.port}"})
    await ws.close()
    assert server.app.num_connections == 0


async def test_allowed_origins_may_use_the_server_and_get_cors_answers(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, allowed_origins="https://app.example, https://b.example/") as srv:
        ws, _ = await open_session(srv, additional_headers={"Origin": "https://app.example"})
        await ws.close()
        ws, _ = await open_session(srv, additional_headers={"Origin": "https://B.example"})
        await ws.close()
        status, _ = await refused(srv, additional_headers={"Origin": "https://c.example"})
        assert status == 403
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            preflight = await http.options(srv.http_base + "/chat/completions", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            response = await http.get(srv.http_base + "/models", headers={"Origin": "https://app.example"})
            assert response.headers["access-control-allow-origin"] == "https://app.example"


# ---------------------------------------------------------------- per-tenant bounds


async def test_connections_and_responses_are_bounded_per_tenant(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, auth="on", max_connections_per_tenant=2,
                              max_responses_per_tenant=1) as srv:
        acme, globex = new_key(srv, "acme"), new_key(srv, "globex")
        first, _ = await open_session(srv, **bearer(acme))
        second, _ = await open_session(srv, **bearer(acme))
        third = await connect(srv.realtime_url, **bearer(acme))
        with pytest.raises(ConnectionClosed):
            await third.recv()
        assert third.close_code == 1013
        other, _ = await open_session(srv, **bearer(globex))  # another tenant is not affected
        # One response at a time for acme: a second, on another connection, is refused with a code.
        await send(first, user_item("Tell me a long story"))
        await recv_until(first, "conversation.item.done")
        await send(first, {"type": "response.create", "response": {"max_output_tokens": 400, "temperature": 1}})
        created = await recv(first, rate_limits=False)
        limits = await recv(first, rate_limits=True)
        assert created["type"] == "response.created" and limits["type"] == "rate_limits.updated"
        assert limits["rate_limits"] == [{"name": "requests", "limit": 1, "remaining": 0, "reset_seconds": 0.0}]
        RateLimitsUpdatedEvent.model_validate(limits)  # the SDK's own type of it
        await send(second, {"type": "response.create", "event_id": "r2"})
        error = (await recv_until(second, "error"))[-1]["error"]
        assert (error["code"], error["type"], error["event_id"]) == ("rate_limit_exceeded", "requests", "r2")
        client = AsyncOpenAI(api_key=acme, base_url=srv.http_base, max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m", messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.code == "rate_limit_exceeded"
        await send(other, {"type": "response.create", "response": {"max_output_tokens": 2}})
        assert (await recv_until(other, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
        await send(first, {"type": "response.cancel"})
        await recv_until(first, "response.done")
        await asyncio.sleep(0.1)  # the slot is released when the response's task ends
        await send(second, {"type": "response.create", "response": {"max_output_tokens": 2}})
        assert (await recv_until(second, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
        for ws in (first, second, other):
            await ws.close()


async def test_a_refused_handshake_logs_one_line_not_an_error(keyed: RunningServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await refused(keyed)
    await asyncio.sleep(0.1)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith(("uvicorn", "assistant"))]
    assert [level for level, _ in lines] == ["INFO"], lines
