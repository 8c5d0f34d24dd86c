"""The handwritten digits: a fixed split, ink that reads as the label, LLaVA-format files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from assistant.data.digits import load_scans, scan_image, split_indices, write_digits
from assistant.data.llava import read_llava


def test_the_split_is_fixed_disjoint_and_complete() -> None:
    held_out, train = split_indices(1797, "heldout"), split_indices(1797, "train")
    assert len(held_out) == 359 and len(train) == 1438 and not set(held_out) & set(train)
    assert held_out == split_indices(1797, "heldout")  # the same on every call and machine
    assert held_out[:5] == sorted(held_out)[:5]


def test_scans_become_black_ink_on_white() -> None:
    images, labels = load_scans()
    assert images.shape == (1797, 8, 8) and set(labels.tolist()) == set(range(10))
    picture = np.asarray(scan_image(images[0]).convert("L"))
    assert picture.shape == (224, 224) and picture[0, 0] == 255 and picture.min() < 40


def test_write_digits(tmp_path: Path) -> None:
    assert write_digits(tmp_path, "heldout") == 359
    examples, problems = read_llava(tmp_path / "qa.json")
    assert len(examples) == 359 and problems == []
    assert all(e.turns[0][1] in "0123456789" for e in examples)
