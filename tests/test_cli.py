"""The command line: `assistant db upgrade` on any URL, config errors that exit cleanly, a quiet `serve` start."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from assistant.cli import main
from assistant.store import Store
from tests.test_store import url  # noqa: F401  (the SQLite + PostgreSQL database fixture)


def test_db_upgrade_on_any_url(url: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert "up to date" in capsys.readouterr().out
    store = Store(url)
    try:
        assert store.is_up_to_date()
        conversation_id = store.create_conversation()
        assert store.conversation_exists(conversation_id)
    finally:
        store.close()
    assert main(["db", "upgrade", "--database-url", url]) == 0  # idempotent


def test_configuration_error_exits_with_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "not-a-port", "--data-dir", str(tmp_path)]) == 2
    assert "port expects int" in capsys.readouterr().err


def test_serve_refuses_a_database_that_was_never_upgraded(tmp_path: Path, url: str) -> None:  # noqa: F811
    if url.startswith("sqlite"):
        pytest.skip("SQLite is upgraded by serve itself")
    from assistant.app import build_app
    from assistant.config import load_config

    config = load_config({"database_url": url, "data_dir": str(tmp_path), "model": str(tmp_path / "unused")}, env={})
    with pytest.raises(RuntimeError, match="assistant db upgrade"):
        build_app(config, progress=lambda _: None)


def serve_command(model_dir: Path, data_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "assistant", "serve", "--model", str(model_dir), "--data-dir", str(data_dir),
            "--dtype", "float32", *flags]


async def test_serve_starts_with_a_few_readable_lines_and_refuses_a_taken_port(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            *serve_command(tiny_model_dir, tmp_path / "one", "--port", str(port)), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 120)
    lines = output.decode().splitlines()
    assert process.returncode == 1 and lines[-1].startswith(f"assistant: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in output.decode()

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        *serve_command(tiny_model_dir, tmp_path / "two", "--port", str(port)), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    lines = []
    try:
        while not lines or "listening on" not in lines[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), 120)
            assert line, f"serve exited: {lines}"
            lines.append(line.decode().rstrip())
    finally:
        process.terminate()
        await process.wait()
    assert len(lines) <= 4, lines  # database, model, (TLS / auth notes), URL: no plug-in or migration chatter
    assert all(line.startswith("assistant: ") for line in lines), lines
    assert lines[-1] == f"assistant: listening on ws://127.0.0.1:{port}/v1/realtime"


def test_train_align_then_finetune_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.training_fixtures import save_tiny_composition, write_data

    composition = save_tiny_composition(tmp_path / "parts")
    data = write_data(tmp_path / "synth", count=4)
    common = ["--steps", "1", "--batch-size", "2", "--device", "cpu", "--dtype", "float32",
              "--data-dir", str(tmp_path / "home")]
    align = ["train", "align", "--model", str(composition), "--data", str(data / "captions.json"),
             "--out", str(tmp_path / "aligned"), *common]

    assert main(align) == 0
    assert main(["train", "finetune", "--model", str(tmp_path / "aligned"), "--data", str(data / "qa.json"),
                 "--out", str(tmp_path / "tuned"), "--lora-rank", "4", *common]) == 0
    assert f"serve it with: assistant serve --model {tmp_path / 'tuned' / 'model.toml'}" in capsys.readouterr().out
    assert main(align) == 2  # the same --out again
    assert "already holds checkpoints of a run (step 1); pass --resume" in capsys.readouterr().err
