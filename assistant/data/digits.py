"""Real images nobody here made: scikit-learn's 1,797 handwritten digit scans, as a recognition task.

The scans are 8×8 pixels of ink intensity 0–16 (UCI's optdigits, shipped inside
scikit-learn: no download). Each becomes black ink on white, scaled up smoothly to 160 px
and centred on a 224×224 canvas. The split is fixed for everyone: a permutation with seed
0, the first 20 % held out (359 scans), the rest for training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 224
DIGIT_PIXELS = 160
SPLIT_SEED = 0
HELD_OUT_SHARE = 0.2
SPLITS = ("train", "heldout")
QUESTIONS = ("What digit is this?", "Which digit is written here?", "What number is shown?")


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in 0..16, labels (1797,) int)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def split_indices(num_scans: int, split: str) -> list[int]:
    """The scan indices of ``split`` ("train" or "heldout"), sorted; the same on every machine."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    order = np.random.default_rng(SPLIT_SEED).permutation(num_scans)
    num_held_out = round(num_scans * HELD_OUT_SHARE)
    chosen = order[:num_held_out] if split == "heldout" else order[num_held_out:]
    return sorted(int(i) for i in chosen)


def scan_image(scan: np.ndarray) -> Image.Image:
    """One 8×8 scan as a 224×224 RGB picture: black ink on white."""
    grey = (255 - np.clip(scan, 0, 16) * (255 / 16)).astype(np.uint8)  # (8, 8)
    digit = Image.fromarray(grey, mode="L").resize((DIGIT_PIXELS, DIGIT_PIXELS), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (SIZE, SIZE), 255)
    offset = (SIZE - DIGIT_PIXELS) // 2
    canvas.paste(digit, (offset, offset))
    return canvas.convert("RGB")


def write_digits(out: Path, split: str) -> int:
    """Write the ``split`` as ``images/digit-NNNN.png`` + ``qa.json`` / ``captions.json`` (LLaVA format)
    + ``meta.jsonl``; returns how many scans were written."""
    images, labels = load_scans()
    indices = split_indices(len(images), split)
    (out / "images").mkdir(parents=True, exist_ok=True)
    qa, captions, meta = [], [], []
    for index in indices:
        name = f"images/digit-{index:04d}.png"
        scan_image(images[index]).save(out / name, format="PNG")
        label = str(int(labels[index]))
        question = QUESTIONS[index % len(QUESTIONS)]
        qa.append({"id": f"digit-{index}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": label}]})
        captions.append({"id": f"digit-{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": f"A handwritten digit {label} in black ink on white."}]})
        meta.append({"index": index, "image": name, "label": int(labels[index]), "split": split})
    (out / "qa.json").write_text(json.dumps(qa, indent=1) + "\n")
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    (out / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return len(indices)
