"""LLaVA-format training data: read, check, and report bad entries by file and position.

The format (LLaVA's ``llava_v1_5_mix665k.json`` and friends) is a JSON list, or JSON
Lines, of ``{"id", "image": path, "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Image paths are relative to
``image_root`` (default: the data file's folder). Turns alternate human → gpt; the
``<image>`` marker appears in the first human turn.

:func:`read_llava` never stops at a bad entry: each one (not an object, no image, a
missing or unreadable image file, no ``<image>`` marker, turns out of order, an empty
answer) becomes a :class:`DataProblem` naming the file and the entry (``line N`` for
JSON Lines, ``entry N`` for a JSON list, counted from 1) and is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Example:
    image: Path
    turns: tuple[tuple[str, str], ...]  # (question, answer) pairs; the marker removed from the first question
    location: str  # "data.jsonl line 3"


@dataclass(frozen=True)
class DataProblem:
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class DataError(ValueError):
    """The file cannot be read at all (missing, not JSON, or no usable entry)."""


def _entries(path: Path) -> list[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it: {exc}") from None
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path} line {number}", json.loads(line)))
            except ValueError as exc:
                entries.append((f"{path} line {number}", DataProblem("", f"not JSON: {exc}")))
        return entries
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries (or a .jsonl file)")
    return [(f"{path} entry {number}", entry) for number, entry in enumerate(data, start=1)]


def _check_entry(entry: Any, image_root: Path, check_images: bool) -> tuple[Path, tuple[tuple[str, str], ...]]:
    """The entry's image path and turns, or raise ValueError saying what is wrong."""
    if isinstance(entry, DataProblem):
        raise ValueError(entry.message)
    if not isinstance(entry, dict):
        raise ValueError("an entry must be an object with 'image' and 'conversations'")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("no 'image' path")
    image_path = image_root / image
    if check_images:
        try:
            with Image.open(image_path) as opened:
                opened.verify()
        except FileNotFoundError:
            raise ValueError(f"image {image_path} does not exist") from None
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise ValueError(f"image {image_path} cannot be read: {exc}") from None
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise ValueError("'conversations' must hold at least one human turn and one gpt turn")
    turns = []
    for number in range(0, len(conversations) - 1, 2):
        human, gpt = conversations[number], conversations[number + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)
                and human.get("from") == "human" and gpt.get("from") == "gpt"):
            raise ValueError(f"turns {number + 1} and {number + 2} must be 'human' then 'gpt'")
        question, answer = human.get("value"), gpt.get("value")
        if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"turn {number + 2} has an empty answer")
        turns.append((question, answer))
    if IMAGE_MARKER not in turns[0][0]:
        raise ValueError(f"the first human turn has no {IMAGE_MARKER} marker")
    first = turns[0][0].replace(IMAGE_MARKER, "").strip()
    return image_path, ((first, turns[0][1]), *turns[1:])


def read_llava(path: Path, image_root: Path | None = None, *,
               check_images: bool = True) -> tuple[list[Example], list[DataProblem]]:
    """The usable examples of a LLaVA-format file and the problems of the others (see the module docstring)."""
    root = image_root if image_root is not None else path.parent
    examples, problems = [], []
    for location, entry in _entries(path):
        try:
            image, turns = _check_entry(entry, root, check_images)
        except ValueError as exc:
            problems.append(DataProblem(location, str(exc)))
            continue
        examples.append(Example(image, turns, location))
    if not examples:
        raise DataError(f"{path}: no usable entry" + (f"; first problem: {problems[0]}" if problems else ""))
    return examples, problems
