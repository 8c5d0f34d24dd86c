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
        assert store.conversation_exists(conversation_id, "default")
    finally:
        store.close()
    assert main(["db", "upgrade", "--database-url", url]) == 0  # idempotent


def test_keys_create_list_revoke(url: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from assistant.keys import Keys

    assert main(["keys", "create", "--tenant", "acme", "--database-url", url]) == 0  # a new database, as `serve`
    out, err = capsys.readouterr()
    key = out.strip()  # stdout is the key alone, for scripts; what it is goes to stderr
    assert key.startswith("sk-asst-") and len(key) == 51 and "shown this once" in err
    store = Store(url)
    try:
        keys = Keys(store.engine)
        assert keys.tenant_of(key) == "acme"
        assert main(["keys", "list", "--database-url", url]) == 0
        listed = capsys.readouterr().out
        assert "acme" in listed and key[:12] + "..." in listed and key not in listed
        assert main(["keys", "create", "--tenant", "no spaces", "--database-url", url]) == 2
        assert main(["keys", "revoke", "key_missing", "--database-url", url]) == 1
        assert "no key 'key_missing'" in capsys.readouterr().err
        assert main(["keys", "revoke", key[:12], "--database-url", url]) == 0  # by the prefix list shows
        assert keys.tenant_of(key) is None and keys.list()[-1].is_revoked
    finally:
        store.close()


def test_configuration_error_exits_with_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "not-a-port", "--data-dir", str(tmp_path)]) == 2
    assert "port expects int" in capsys.readouterr().err


def test_serve_upgrades_any_database_before_loading_the_model(tmp_path: Path, url: str) -> None:  # noqa: F811
    from assistant.app import close_app, open_app
    from assistant.config import load_config

    config = load_config({"database_url": url, "data_dir": str(tmp_path), "model": str(tmp_path / "unused")}, env={})
    app = open_app(config, progress=lambda _: None)
    try:
        assert app.store.is_up_to_date()
    finally:
        close_app(app)


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
    lines = await startup_lines(serve_command(tiny_model_dir, tmp_path / "two", "--port", str(port)), env)
    assert len(lines) <= 5, lines  # database, model, keys, (TLS note), URL: no plug-in or migration chatter
    assert all(line.startswith("assistant: ") for line in lines), lines
    assert lines[-1] == f"assistant: listening on ws://127.0.0.1:{port}/v1/realtime and http://127.0.0.1:{port}/v1"


@pytest.mark.real_model
async def test_the_default_model_starts_as_quietly(tmp_path: Path) -> None:
    """The quantized vision default (peft and the adapter loading too): four lines (database, keys, model, URL);
    the port is open from the second on, /readyz saying 503 until the last."""
    from assistant.models import default_data_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "assistant", "serve", "--port", str(port), "--data-dir", str(default_data_dir()),
               "--database-url", f"sqlite:///{tmp_path / 'assistant.db'}"]
    lines = await startup_lines(command, env)
    assert len(lines) == 4 and all(line.startswith("assistant: ") for line in lines), lines
    assert lines[1].startswith("assistant: no API key required: only this machine can connect (127.0.0.1)")
    from assistant.engine.quantize import cpu_packs_nf4

    quantized = "int4-cpu" if cpu_packs_nf4() else "int8-cpu"  # --quantize auto
    assert f"(bfloat16, {quantized})" in lines[2] and "smollm2-135m-vision" in lines[2]


async def startup_lines(command: list[str], env: dict[str, str]) -> list[str]:
    """What ``assistant serve`` prints up to and including its "listening on" line; then it is stopped."""
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or "listening on" not in lines[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), 120)
            assert line, f"serve exited: {lines}"
            lines.append(line.decode().rstrip())
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
    return lines


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


# ---------------------------------------------------------------- assistant match


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.vision_fixtures import save_tiny_llava_chat

    return save_tiny_llava_chat(tmp_path_factory.mktemp("llava"), "clip")


def match_command(image: Path, model: Path, data_dir: Path, *texts: str) -> list[str]:
    return ["match", str(image), *texts, "--model", str(model), "--dtype", "float32", "--device", "cpu",
            "--data-dir", str(data_dir)]


def table_rows(out: str) -> list[tuple[int, float, str]]:
    """(rank, score, text) of each row under the header."""
    rows = []
    for line in out.splitlines()[1:]:
        rank, score, *_, rest = line.split(maxsplit=6)
        rows.append((int(rank), float(score), rest))
    return rows


def test_match_prints_the_texts_best_first_and_as_json(llava_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tests.vision_fixtures import make_image

    make_image(1).save(tmp_path / "picture.png")
    texts = ["a cat", "two red circles", "Hello world"]
    assert main(match_command(tmp_path / "picture.png", llava_dir, tmp_path / "data", *texts)) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [rank for rank, _, _ in rows] == [1, 2, 3] and sorted(text for _, _, text in rows) == sorted(texts)
    assert [score for _, score, _ in rows] == sorted((score for _, score, _ in rows), reverse=True)
    assert main([*match_command(tmp_path / "picture.png", llava_dir, tmp_path / "data", *texts), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "Describe this image."
    assert [texts[i] for i in result["ranking"]] == [text for _, _, text in rows]
    assert [round(result["scores"][i]["score"], 3) for i in result["ranking"]] == [score for _, score, _ in rows]
    assert result["scoring"] == "likelihood"
    assert main([*match_command(tmp_path / "picture.png", llava_dir, tmp_path / "data", *texts), "--json",
                 "--scoring", "gain"]) == 0
    gains = json.loads(capsys.readouterr().out)
    assert gains["scoring"] == "gain"
    for s in gains["scores"]:
        assert s["score"] == pytest.approx(s["log_likelihood"] - s["log_likelihood_without_image"])


def test_match_ranks_what_the_model_sees_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from assistant.engine import loader
    from tests.matching_fixtures import CAPTIONS, bag_of_words_chat_model, save_bag_of_words_model, solid_png

    seeing = bag_of_words_chat_model(save_bag_of_words_model(tmp_path / "bow"))
    monkeypatch.setattr(loader, "load_model", lambda config, progress: seeing)  # a model no --model can name
    (tmp_path / "blue.png").write_bytes(solid_png((0, 0, 255)))
    assert main(match_command(tmp_path / "blue.png", tmp_path / "bow", tmp_path / "data", *CAPTIONS.values())) == 0
    assert table_rows(capsys.readouterr().out)[0][2] == "the blue sky"


def test_match_refuses_a_text_only_model_and_a_bad_image(tiny_model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tests.vision_fixtures import make_image

    make_image(1).save(tmp_path / "picture.png")
    assert main(match_command(tmp_path / "picture.png", tiny_model_dir, tmp_path / "data", "a cat")) == 2
    assert "is a text-only model; matching needs a vision model" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    # The image is checked before any model loads: this model directory does not even exist.
    assert main(match_command(tmp_path / "notes.png", tmp_path / "no-model", tmp_path / "data", "a cat")) == 2
    assert "(image_unsupported_format)" in capsys.readouterr().err
    assert main(match_command(tmp_path / "missing.png", tmp_path / "no-model", tmp_path / "data", "a cat")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(match_command(tmp_path / "picture.png", tmp_path / "no-model", tmp_path / "data", "")) == 2


def test_doctor_prints_what_a_bug_report_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["doctor", "--data-dir", str(tmp_path), "--database-url", database]) == 0
    report = capsys.readouterr().out
    for expected in ("versions:", "torch ", "bitsandbytes backend ", "avx512_bf16 ", "--quantize auto (here: ",
                     f"data dir {tmp_path}", "no models pulled yet", "schema NOT at the newest migration",
                     "--auth auto"):
        assert expected in report, expected
    main(["db", "upgrade", "--database-url", database])
    main(["keys", "create", "--tenant", "acme", "--database-url", database])
    capsys.readouterr()
    assert main(["doctor", "--data-dir", str(tmp_path), "--database-url", database]) == 0
    assert "keys: 1 active, 0 revoked" in capsys.readouterr().out
    main(["doctor", "--database-url", "postgresql+psycopg://someone:hunter2@127.0.0.1:5432/test"])
    report = capsys.readouterr().out
    assert "hunter2" not in report and "someone:***@127.0.0.1" in report


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from assistant.cli import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        configure_logging("info", "json")
        logging.getLogger("assistant.server").info("connection %s: conversation %s", "sess_1", "conv_1")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (line["level"], line["logger"], line["message"]) == ("info", "assistant.server",
                                                                     "connection sess_1: conversation conv_1")
        assert line["time"].endswith("+00:00")
    finally:
        root.handlers, root.level = saved
