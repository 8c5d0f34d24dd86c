"""Synthetic scenes: deterministic per seed, content as planned, LLaVA-format files that read back cleanly."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from assistant.cli import main
from assistant.data.llava import read_llava
from assistant.data.synth import COLOURS, SIZE, plan_sample, render, write_synth


def digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_a_larger_count_only_adds(tmp_path: Path) -> None:
    write_synth(tmp_path / "a", 12, seed=5)
    write_synth(tmp_path / "b", 12, seed=5)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    write_synth(tmp_path / "c", 12, seed=6)
    assert digest(tmp_path / "a")["images/000000.png"] != digest(tmp_path / "c")["images/000000.png"]
    more = write_synth(tmp_path / "d", 20, seed=5)
    assert [s.caption for s in more[:12]] == [plan_sample(5, i).caption for i in range(12)]
    assert digest(tmp_path / "d")["images/000011.png"] == digest(tmp_path / "a")["images/000011.png"]


def test_the_pixels_show_the_planned_colour(tmp_path: Path) -> None:
    for index in range(40):
        sample = plan_sample(1, index)
        if sample.kind != "shape":
            continue
        pixels = np.asarray(render(sample, 1), dtype=np.int32).reshape(-1, 3)
        distance = np.abs(pixels - np.array(COLOURS[sample.colour])).sum(axis=1)
        share = (distance < 60).mean()  # noise and the gradient keep exact matches rare
        assert share > 0.01, (sample, share)  # a small triangle covers 1.6 % of the canvas, a circle 3.8 %


def test_the_mix_covers_every_kind_and_count(tmp_path: Path) -> None:
    samples = [plan_sample(0, i) for i in range(300)]
    assert set(Counter(s.kind for s in samples)) == {"shape", "count", "text"}
    assert {s.count for s in samples if s.kind == "count"} == {1, 2, 3, 4}
    assert len({s.colour for s in samples}) == len(COLOURS)
    for s in samples:
        assert s.caption and s.qa and all(answer for _, answer in s.qa)
        if s.kind == "count":
            assert ("How many " in s.qa[0][0]) and s.qa[0][1] == str(s.count)


def test_files_are_llava_format_and_the_command_writes_them(tmp_path: Path, capsys) -> None:
    assert main(["data", "synth", "--out", str(tmp_path), "--count", "6", "--seed", "2"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    captions, problems = read_llava(tmp_path / "captions.json")
    assert len(captions) == 6 and problems == []
    meta = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    # qa.json: every question alone with its image, as a served question comes (none gives another away)
    questions, problems = read_llava(tmp_path / "qa.json")
    assert problems == [] and all(len(example.turns) == 1 for example in questions)
    assert [(e.image.name, *e.turns[0]) for e in questions] == [
        (Path(m["image"]).name, question, answer) for m in meta for question, answer in m["qa"]]
    assert [m["image"] for m in meta] == [f"images/{i:06d}.png" for i in range(6)]
    from PIL import Image

    assert Image.open(tmp_path / meta[0]["image"]).size == (SIZE, SIZE)
    assert main(["data", "synth", "--out", str(tmp_path), "--count", "0", "--seed", "2"]) == 2
