"""Tiny compositions and data for the training tests: a random 2-layer Llama + a random tiny CLIP tower.

The tower is a real ``CLIPVisionModel`` (32 px, 8 px patches: 16 image tokens of
width 32), so training runs the same code as with EfficientNet-Lite0 or a real
CLIP, in seconds and without pulled weights. The composition names a projector
directory that does not exist: training starts a fresh one there.
"""

from __future__ import annotations

import json
from pathlib import Path

from assistant.config import Config
from assistant.data.synth import write_synth
from assistant.training.settings import TrainSettings
from tests.engine_fixtures import save_tiny_chat_model
from tests.vision_fixtures import save_tiny_tower

CONTEXT = 1024  # the byte-level tokenizer spends a token on most characters: room for four question turns


def save_tiny_composition(directory: Path) -> Path:
    """directory/model.toml: the tiny Llama (hidden 64) + a tiny CLIP tower; its projector does not exist yet."""
    save_tiny_chat_model(directory / "decoder", max_position_embeddings=CONTEXT)
    save_tiny_tower(directory / "clip", "clip")
    toml = directory / "model.toml"
    toml.write_text('decoder = "decoder"\n[vision]\nencoder = "clip"\nprojector = "projector"\n')
    return toml


def write_data(directory: Path, count: int = 8, seed: int = 1) -> Path:
    """Synthetic images with captions.json and qa.json (assistant data synth)."""
    write_synth(directory, count, seed)
    return directory


def write_llava(path: Path, entries: list[object]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def entry(image: str, question: str, answer: str) -> dict[str, object]:
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def settings(stage: str, model: Path, data: Path | list[Path], out: Path, **overrides: object) -> TrainSettings:
    """Small, fast, quiet settings: float32 on CPU, batches of 4, no progress bar."""
    files = tuple(data) if isinstance(data, list) else (data,)
    values: dict[str, object] = {"device": "cpu", "dtype": "float32", "batch_size": 4, "show_progress": False,
                                 **overrides}
    return TrainSettings(stage, model, files, out, **values)  # type: ignore[arg-type]


def config(data_dir: Path) -> Config:
    return Config(data_dir=data_dir)
