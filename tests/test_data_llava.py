"""LLaVA-format reading: good entries come back, each bad one is reported with its file and position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from assistant.data.llava import DataError, read_llava


def turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_bad_entries_are_reported_by_line_and_skipped(images: Path) -> None:
    lines = [
        {"image": "good.png", "conversations": turn("<image>\nWhat colour?", "red") + turn("Sure?", "yes")},
        {"image": "missing.png", "conversations": turn("<image>\nWhat?", "x")},
        {"image": "broken.png", "conversations": turn("<image>\nWhat?", "x")},
        {"image": "good.png", "conversations": turn("What colour?", "red")},
        {"image": "good.png", "conversations": turn("<image>\nWhat colour?", "  ")},
        {"conversations": turn("<image>\nWhat?", "x")},
        {"image": "good.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
    ]
    path = images / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    examples, problems = read_llava(path)
    assert [e.location for e in examples] == [f"{path} line 1"]
    assert examples[0].turns == (("What colour?", "red"), ("Sure?", "yes"))
    assert examples[0].image == images / "good.png"
    messages = {p.location.rsplit(" ", 1)[-1]: p.message for p in problems}
    assert "does not exist" in messages["2"] and "cannot be read" in messages["3"]
    assert "<image>" in messages["4"] and "empty answer" in messages["5"] and "no 'image'" in messages["6"]
    assert "'human' then 'gpt'" in messages["7"] and "not JSON" in messages["8"]


def test_a_json_list_counts_entries_and_a_useless_file_is_refused(images: Path) -> None:
    path = images / "data.json"
    path.write_text(json.dumps([{"image": "good.png", "conversations": turn("<image>\nQ", "A")}, 5]))
    examples, problems = read_llava(path)
    assert len(examples) == 1 and problems[0].location == f"{path} entry 2"
    path.write_text(json.dumps([5]))
    with pytest.raises(DataError, match="no usable entry"):
        read_llava(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not JSON"):
        read_llava(path)
