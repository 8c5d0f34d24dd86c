"""The reference deployment (deploy/nginx-assistant.conf): Debian's nginx in front of two replicas on one
PostgreSQL database, a conversation carried through it across a replica restart.

nginx runs the committed config with only its ports replaced; the replicas are real ``assistant serve``
processes. Without nginx the test skips, except in CI, where it must run (``.ci/run`` installs nginx).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.process_fixtures import Served, free_port, serve
from tests.test_store import _postgres_schema_url

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "nginx-assistant.conf"
TIMEOUT = 60
pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_schema_url()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    """nginx on a free port with the committed config, in front of two replica ports; (nginx, first, second)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing in CI; .ci/run installs it")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    ports = free_port(), free_port(), free_port()
    site = CONFIG.read_text().replace("listen 8765;", f"listen 127.0.0.1:{ports[0]};")
    site = site.replace("127.0.0.1:8801", f"127.0.0.1:{ports[1]}").replace("127.0.0.1:8802", f"127.0.0.1:{ports[2]}")
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx"
    temp.mkdir()
    main = f"""
        daemon off;
        {"user root;" if os.geteuid() == 0 else ""}
        pid {temp}/nginx.pid;
        error_log {temp}/error.log info;
        events {{}}
        http {{
            access_log {temp}/access.log;
            client_body_temp_path {temp}/body;
            proxy_temp_path {temp}/proxy;
            fastcgi_temp_path {temp}/fastcgi;
            uwsgi_temp_path {temp}/uwsgi;
            scgi_temp_path {temp}/scgi;
            include {tmp_path / "site.conf"};
        }}
    """
    (tmp_path / "nginx.conf").write_text(main)
    process = subprocess.Popen([binary, "-p", str(temp), "-c", str(tmp_path / "nginx.conf")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with httpx.Client() as http:
                http.get(f"http://127.0.0.1:{ports[0]}/healthz", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None:
                pytest.fail(f"nginx did not start: {process.stdout.read() if process.stdout else ''}")
            time.sleep(0.1)
    try:
        yield ports
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def recv_until(ws: ClientConnection, type_: str) -> list[dict[str, Any]]:
    events = [await recv(ws)]
    while events[-1]["type"] != type_:
        events.append(await recv(ws))
    return events


async def turn(ws: ClientConnection, text: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await recv_until(ws, "conversation.item.done")
    await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
    return (await recv_until(ws, "response.done"))[-1]["response"]


def served_by(conversation: str, *replicas: Served) -> list[int]:
    """Which replicas logged a connection to ``conversation`` (index in ``replicas``), in order of their logs."""
    return [index for index, replica in enumerate(replicas) for line in replica.lines
            if f"conversation {conversation}," in line]


async def test_a_conversation_goes_on_through_nginx_across_a_replica_restart(
        nginx: tuple[int, int, int], postgres_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    front, first_port, second_port = nginx
    url = f"ws://127.0.0.1:{front}/v1/realtime"
    flags = ("--database-url", postgres_url, "--drain-timeout", "0")
    async with serve(tiny_model_dir, tmp_path / "a", *flags, port=first_port) as first, \
            serve(tiny_model_dir, tmp_path / "b", *flags, port=second_port) as second:
        replicas = (first, second)
        ws = await connect(url)
        conversation = (await recv(ws))["session"]["conversation_id"]
        assert (await turn(ws, "Hello"))["status"] in ("completed", "incomplete")
        await ws.close()

        # Sticky: every reconnect to the conversation reaches the same replica.
        for _ in range(3):
            ws = await connect(f"{url}?conversation={conversation}")
            await recv(ws)
            await ws.close()
        deadline = time.monotonic() + 10
        while len(served_by(conversation, *replicas)) < 4 and time.monotonic() < deadline:  # their log lines
            for replica in replicas:
                await _drain_output(replica)
        counts = [served_by(conversation, replica) for replica in replicas]
        # The first connection made the conversation wherever it landed; the three that named it met one replica.
        assert sorted(len(lines) for lines in counts) in ([0, 4], [1, 3]), counts
        sticky = replicas[max((0, 1), key=lambda index: len(counts[index]))]
        home = [replicas.index(sticky)]

        # That replica restarts (SIGTERM, graceful): the other one serves the conversation from the database.
        sticky.process.send_signal(signal.SIGTERM)
        assert await sticky.exit_code() == 0
        ws = await connect(f"{url}?conversation={conversation}")
        await recv(ws)
        assert (await turn(ws, "Still there?"))["status"] in ("completed", "incomplete")
        await ws.close()
        other = replicas[1 - home[0]]
        await _drain_output(other)
        assert served_by(conversation, other)

        # The replica is back (a fresh process, its caches empty): the whole conversation, both turns, through
        # nginx's REST path (routed by the id in the path), whichever replica nginx picks.
        async with serve(tiny_model_dir, tmp_path / "c", *flags, port=sticky.port):
            await _check_through(front, conversation)


async def _check_through(front: int, conversation: str) -> None:
    """The conversation's items through nginx's REST route, and a streamed chat completion through it."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        items = (await http.get(f"http://127.0.0.1:{front}/v1/conversations/{conversation}/items",
                                params={"order": "asc"})).json()["data"]
    assert [(item["role"], item["content"][0].get("text")) for item in items][::2] == [
        ("user", "Hello"), ("user", "Still there?")]
    # Server-sent events pass through unbuffered.
    client = openai.AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{front}/v1", max_retries=0)
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=3, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


async def _drain_output(replica: Served) -> None:
    """Read what the replica printed so far (without waiting for more)."""
    assert replica.process.stdout is not None
    while True:
        try:
            raw = await asyncio.wait_for(replica.process.stdout.readline(), 0.05)
        except TimeoutError:
            return
        if not raw:
            return
        replica.lines.append(raw.decode().rstrip())
