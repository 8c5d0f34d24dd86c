"""The on-disk encoder-feature cache: each training image goes through the encoder once, ever.

The encoder is frozen in both training stages, so its output for an image never
changes: :meth:`FeatureCache.compute` runs the encoder (batched, no gradients) on
the images it has not seen and writes each one's pre-projector features
``(T_high, in_dim)`` (EfficientNet-Lite0: ``(49, 1280)``) as float16 to one
safetensors file. Later epochs, later runs, and the other stage read the file.

Layout: ``root/<encoder identity>/<sha[:2]>/<sha256>.safetensors``. The folder
name is the vision part's ``encoder_identity`` (weights, dtype, preprocessing,
feature layer: not the projector, which is what trains) and its
``preprocess_key`` at :data:`~assistant.training.examples.TRAIN_DETAIL`, made
file-name safe; ``sha256`` is that of the image file's bytes. Files are written
to a temporary name and renamed, so an interrupted run leaves no half-written
entry. Images are decoded as serving decodes them
(:func:`assistant.images.decode_stored`: EXIF orientation applied, RGB); one that
cannot be decoded becomes a :class:`~assistant.data.llava.DataProblem`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from assistant.data.llava import DataProblem
from assistant.engine.vision import ProjectedVision
from assistant.images import decode_stored
from assistant.training.examples import TRAIN_DETAIL

ENCODE_BATCH_SIZE = 32


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


class FeatureCache:
    def __init__(self, root: Path, vision: ProjectedVision) -> None:
        self.vision = vision
        key = f"{vision.encoder_identity}@{vision.preprocess_key(TRAIN_DETAIL)}"
        self.directory = Path(root).expanduser() / safe_name(key)
        self.num_computed = 0  # images this object ran through the encoder

    def path(self, sha256: str) -> Path:
        return self.directory / sha256[:2] / f"{sha256}.safetensors"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def compute(self, images: dict[str, tuple[Path, str]], *, show_progress: bool = False) -> list[DataProblem]:
        """Encode the images not cached yet (``sha256 → (path, location)``); the problems of those that failed."""
        missing = [(sha, path, location) for sha, (path, location) in images.items() if not self.has(sha)]
        problems: list[DataProblem] = []
        bar = tqdm(total=len(missing), desc="encoding images", unit="img", disable=not (missing and show_progress))
        for start in range(0, len(missing), ENCODE_BATCH_SIZE):
            decoded = []
            for sha, path, location in missing[start:start + ENCODE_BATCH_SIZE]:
                try:
                    decoded.append((sha, decode_stored(path.read_bytes())))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # Pillow's
                    problems.append(DataProblem(location, f"image {path} cannot be decoded: {exc}"))
            if decoded:
                features = self.vision.features([image for _, image in decoded])  # (N, T_high, in_dim)
                for (sha, _), row in zip(decoded, features, strict=True):
                    self._write(sha, row)
                self.num_computed += len(decoded)
            bar.update(min(ENCODE_BATCH_SIZE, len(missing) - start))
        bar.close()
        return problems

    def load(self, sha256s: tuple[str, ...] | list[str], device: str | torch.device = "cpu") -> torch.Tensor:
        """(N, T_high, in_dim) float32 features of cached images, in order."""
        rows = [load_file(self.path(sha))["features"] for sha in sha256s]
        return torch.stack(rows).to(device=device, dtype=torch.float32)

    def _write(self, sha256: str, features: torch.Tensor) -> None:
        path = self.path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({"features": features.detach().to("cpu", torch.float16).contiguous()}, partial)
        os.replace(partial, path)
