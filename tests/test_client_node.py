"""The official Node `openai` package's Realtime client (``OpenAIRealtimeWS``) against a loopback server.

The SDK only speaks ``wss://``: the server gets a self-signed certificate, which node trusts
through ``NODE_EXTRA_CA_CERTS``; plain ``ws://`` goes through ``ws``'s ``createConnection``.
``tests/node/realtime_turns.mjs`` runs the turns and prints a JSON summary;
``tests/node/chat.mjs`` is the README's example. ``bin/setup`` installs their pinned packages
(``npm ci --prefix tests/node``); without node or those packages the tests are skipped
locally and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server
from tests.test_server_images import IMAGE_TOKENS, vision_model  # noqa: F401 (a fixture)
from tests.tls_fixtures import make_self_signed_cert
from tests.vision_fixtures import make_image

NODE_DIR = Path(__file__).parent / "node"
TURNS = NODE_DIR / "realtime_turns.mjs"
CHAT = NODE_DIR / "chat.mjs"  # the README's example
README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT = 90
MAX_OUTPUT_TOKENS = 8  # the script's session.update


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    if executable is not None and (NODE_DIR / "node_modules").is_dir():
        return executable
    missing = "node is not installed" if executable is None else "tests/node/node_modules is missing: run bin/setup"
    if os.environ.get("CI") == "true":
        pytest.fail(missing)
    pytest.skip(missing)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


def tls_options(certificate: tuple[Path, Path]) -> dict[str, object]:
    cert, key = certificate
    return {"tls_certfile": cert, "tls_keyfile": key}


async def run_node(node: str, script: Path, *args: str, trust: Path | None = None) -> tuple[int, str, str]:
    """Run ``script`` without blocking the event loop (the server runs in it): (exit code, stdout, stderr)."""
    env = {**os.environ}
    env.pop("NODE_EXTRA_CA_CERTS", None)
    if trust is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(trust)
    process = await asyncio.create_subprocess_exec(node, str(script), *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


async def run_turns(node: str, server: RunningServer, *args: str,
                    trust: Path | None = None) -> tuple[int, dict[str, Any]]:
    """realtime_turns.mjs against ``server``: (exit code, its JSON summary)."""
    code, stdout, stderr = await run_node(node, TURNS, server.http_base, *args, trust=trust)
    if not stdout.strip():
        pytest.fail(f"node exited {code} without a summary: {stderr}")
    return code, json.loads(stdout)


def assert_streamed_answer(turn: dict[str, Any]) -> None:
    """What a user of the SDK sees: deltas that add up to the final text, one response.done with usage."""
    assert turn["errors"] == []
    assert turn["events"][0] == "conversation.item.added" and turn["events"][-1] == "response.done"
    assert turn["events"].count("response.done") == 1
    assert turn["num_deltas"] > 0
    assert turn["text"] == turn["text_done"] == turn["response"]["output_text"]
    response = turn["response"]
    assert response["status"] in ("completed", "incomplete")
    usage = response["usage"]
    assert 0 < usage["output_tokens"] <= MAX_OUTPUT_TOKENS
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_text_turn_over_wss(node: str, tiny_model: ChatModel, data_dir: Path,
                                  certificate: tuple[Path, Path]) -> None:
    async with running_server(tiny_model, data_dir, **tls_options(certificate)) as server:
        code, summary = await run_turns(node, server, trust=certificate[0])
    assert code == 0, summary
    assert summary["url"] == f"wss://127.0.0.1:{server.port}/v1/realtime?model=assistant"
    assert summary["session"]["output_modalities"] == ["text"]
    assert summary["session"]["conversation_id"]
    assert summary["transport_errors"] == []
    assert summary["events_seen"][:2] == ["session.created", "session.updated"]
    turn = summary["turns"]["text"]
    assert_streamed_answer(turn)
    assert turn["response"]["usage"]["input_token_details"]["image_tokens"] == 0
    assert summary["close_code"] == 1000


async def test_image_turn_over_wss(node: str, vision_model: ChatModel, data_dir: Path,  # noqa: F811
                                   certificate: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "picture.png"
    make_image(1).save(image, format="PNG")
    async with running_server(vision_model, data_dir, **tls_options(certificate)) as server:
        code, summary = await run_turns(node, server, "--image", str(image), trust=certificate[0])
    assert code == 0, summary
    turn = summary["turns"]["image"]
    assert_streamed_answer(turn)
    assert turn["response"]["usage"]["input_token_details"]["image_tokens"] == IMAGE_TOKENS


async def test_text_only_model_answers_an_image_with_a_coded_error(
        node: str, tiny_model: ChatModel, data_dir: Path, certificate: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "picture.png"
    make_image(2).save(image, format="PNG")
    async with running_server(tiny_model, data_dir, **tls_options(certificate)) as server:
        code, summary = await run_turns(node, server, "--image", str(image), trust=certificate[0])
    assert code == 0, summary
    turn = summary["turns"]["image"]
    assert [error["code"] for error in turn["errors"]] == ["image_input_not_supported"]
    assert "conversation.item.added" not in turn["events"][:turn["events"].index("error")]
    assert turn["response"]["status"] in ("completed", "incomplete")  # the turn goes on without the image


async def test_untrusted_certificate_is_refused(node: str, tiny_model: ChatModel, data_dir: Path,
                                                certificate: tuple[Path, Path]) -> None:
    async with running_server(tiny_model, data_dir, **tls_options(certificate)) as server:
        code, summary = await run_turns(node, server)
    assert code == 1 and summary["session"] is None
    assert any("self-signed" in error for error in summary["transport_errors"]), summary


async def test_plain_ws_through_create_connection(node: str, tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir) as server:
        code, summary = await run_turns(node, server, "--plain")
    assert code == 0, summary
    assert summary["url"].startswith("wss://")  # what the SDK builds; the connection under it is plain TCP
    assert_streamed_answer(summary["turns"]["text"])


def test_readme_shows_the_tested_code() -> None:
    readme = README.read_text()
    assert CHAT.read_text() in readme
    plain_connect = next(line.strip() for line in TURNS.read_text().splitlines() if "createConnection" in line)
    assert plain_connect in readme


async def test_readme_example_streams_an_answer(node: str, tiny_model: ChatModel, data_dir: Path,
                                                certificate: tuple[Path, Path]) -> None:
    async with running_server(tiny_model, data_dir, **tls_options(certificate)) as server:
        code, stdout, stderr = await run_node(node, CHAT, server.http_base, trust=certificate[0])
    assert code == 0 and stderr == "", stderr
    assert stdout.startswith("conversation: conv_")
    assert "output_tokens: " in stdout
