"""The feature cache: each image through the encoder once, across epochs and runs; bad images reported."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

from assistant.engine import efficientnet
from assistant.engine.vision import ProjectedVision, Projector
from assistant.training.features import FeatureCache


class CountingVision(ProjectedVision):
    """A stand-in encoder: the mean colour of each quarter of the image (4 tokens of width 3), counted."""

    image_size = 8
    grid = 2
    num_high_tokens = 4

    def __init__(self, identity: str = "counting:0") -> None:
        self.encoder_identity = identity
        self.identity = identity + "+proj"
        self.projector = Projector("linear", 3, 4)
        self.hidden_size = 4
        self.num_encoded = 0

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        self.num_encoded += len(images)
        pixels = torch.stack([efficientnet.pixels_of(image.convert("RGB").resize((2, 2))).flatten(1).T
                              for image in images])  # (N, 4, 3)
        return pixels / 255.0


def save_images(directory: Path, colours: list[str]) -> dict[str, tuple[Path, str]]:
    """sha256 → (path, location) of one small PNG per colour."""
    images = {}
    for number, colour in enumerate(colours, start=1):
        path = directory / f"{colour}.png"
        Image.new("RGB", (8, 8), colour).save(path)
        images[hashlib.sha256(path.read_bytes()).hexdigest()] = (path, f"data.json entry {number}")
    return images


def test_each_image_is_encoded_once_across_epochs_and_runs(tmp_path: Path) -> None:
    images = save_images(tmp_path, ["red", "green", "blue"])
    vision = CountingVision()
    cache = FeatureCache(tmp_path / "features", vision)

    assert cache.compute(images) == []
    assert cache.compute(images) == []  # a second epoch
    next_run = FeatureCache(tmp_path / "features", vision)
    assert next_run.compute(images) == []
    assert vision.num_encoded == cache.num_computed == 3 and next_run.num_computed == 0

    red = next(sha for sha, (path, _) in images.items() if path.stem == "red")
    features = next_run.load([red, red])
    assert features.shape == (2, 4, 3) and features.dtype == torch.float32
    assert torch.allclose(features[0], torch.tensor([[1.0, 0.0, 0.0]] * 4), atol=1e-3)  # stored as float16


def test_another_encoder_has_its_own_entries(tmp_path: Path) -> None:
    images = save_images(tmp_path, ["red"])
    FeatureCache(tmp_path / "features", CountingVision("counting:0")).compute(images)
    other = CountingVision("counting:1")

    FeatureCache(tmp_path / "features", other).compute(images)

    assert other.num_encoded == 1


def test_an_image_that_cannot_be_decoded_is_a_problem_with_its_location(tmp_path: Path) -> None:
    images = save_images(tmp_path, ["red"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    images["0" * 64] = (tmp_path / "bad.png", "data.json entry 7")
    cache = FeatureCache(tmp_path / "features", CountingVision())

    problems = cache.compute(images)

    assert [p.location for p in problems] == ["data.json entry 7"] and "cannot be decoded" in problems[0].message
    assert cache.num_computed == 1 and not cache.has("0" * 64)
