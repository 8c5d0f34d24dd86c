"""How ``bench.vision_eval`` scores an answer against what an image is known to show. Pure: no I/O, no model.

Every attribute has a closed set of *values*, each with its spellings, matched as
whole words, case-insensitively (``"red"`` is not found in ``"reddish"``, ``"7"`` not
in ``"17"``):

- ``colour``: the eight colours of :mod:`assistant.data.synth`, plus grey/gray, brown
  and pink as wrong answers a model may give;
- ``shape``: circle, square, triangle, star, plus rectangle, oval, diamond, heart,
  hexagon, pentagon as wrong answers; singular or plural (``"circles"``);
- ``position``: center (also "centre", "middle"), left, right, top, bottom;
- ``count`` and ``digit``: the numbers 0–99 as digits, 0–12 also as words ("three"),
  and any other run of digits (100 and up, "007") as a wrong answer;
- ``text`` (the word or number a text image shows): the synth word list and those numbers.

An answer is **correct** for an attribute when the value named *first* in it (the one
whose earliest spelling starts earliest) is the expected one: the expected value
appears and no other value of that attribute appears before it. "It is red." and
"Red, on a white background" are right for red; "It is orange, or red" is wrong; an
answer naming no value is wrong. "top left" answers *top*.

A caption **names the image** when it names the sample's colour and, for a shape or
count image, its shape (singular or plural), for a text image, its word or number —
anywhere, in any order; other values may appear too.

Matching candidates: the true caption and captions of other samples of the same seed
whose known content differs (kind, colour, shape, count, position or text, not just
size or background), so exactly one candidate describes the image.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from assistant.data.synth import COLOURS, PLACES, POSITIONS, SHAPES, WORDS, Sample

NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
OTHER_COLOURS = {"grey": ("grey", "gray"), "brown": ("brown",), "pink": ("pink",)}
OTHER_SHAPES = ("rectangle", "oval", "diamond", "heart", "hexagon", "pentagon")
POSITION_SPELLINGS = {"center": ("center", "centre", "middle")}


def _whole_words(*spellings: str) -> re.Pattern[str]:
    return re.compile("|".join(rf"(?<!\w){re.escape(s)}(?!\w)" for s in spellings), re.IGNORECASE)


def _values(spellings: dict[str, Sequence[str]]) -> dict[str, re.Pattern[str]]:
    return {value: _whole_words(*words) for value, words in spellings.items()}


NUMBERS = {**_values({str(n): (str(n), *NUMBER_NAMES[n:n + 1]) for n in range(100)}),
           "another number": re.compile(r"(?<!\w)(?:[1-9]\d{2,}|0\d+)(?!\w)")}  # 100 and up, "007": never right
ATTRIBUTE_VALUES: dict[str, dict[str, re.Pattern[str]]] = {
    "colour": _values({**{c: (c,) for c in COLOURS}, **OTHER_COLOURS}),
    "shape": _values({s: (s, f"{s}s") for s in (*SHAPES, *OTHER_SHAPES)}),
    "position": _values({p: POSITION_SPELLINGS.get(p, (p,)) for p in POSITIONS}),
    "count": NUMBERS,
    "digit": NUMBERS,
    "text": {**_values({w: (w,) for w in WORDS}), **NUMBERS},
}


def first_named(answer: str, attribute: str) -> str | None:
    """The value of ``attribute`` whose spelling starts earliest in ``answer`` (None: no value is named)."""
    starts = {}
    for value, pattern in ATTRIBUTE_VALUES[attribute].items():
        found = pattern.search(answer)
        if found:
            starts[value] = (found.start(), -len(found.group()))  # at one start, the longer spelling wins
    return min(starts, key=starts.__getitem__) if starts else None


def is_correct(answer: str, attribute: str, expected: str) -> bool:
    return first_named(answer, attribute) == expected


def names_image(caption: str, sample: Sample) -> bool:
    """Whether ``caption`` names the sample's colour and its shape (shape, count images) or text (text images)."""
    has_colour = ATTRIBUTE_VALUES["colour"][sample.colour].search(caption) is not None
    thing = ATTRIBUTE_VALUES["shape"][sample.shape] if sample.shape else ATTRIBUTE_VALUES["text"][str(sample.text)]
    return has_colour and thing.search(caption) is not None


def attribute_questions(sample: Sample) -> list[tuple[str, str, str]]:
    """(attribute, question, expected value) for the sample's training questions, except the size question.

    The questions are those of ``qa.json`` (:func:`assistant.data.synth.plan_sample`): the
    phrasing the model was trained on, asked of images it never saw.
    """
    known = {"colour": (sample.colour, sample.colour)}  # attribute: (its answer in qa.json, expected value)
    if sample.shape:
        known["shape"] = (sample.shape, sample.shape)
    if sample.kind == "count":
        known["count"] = (str(sample.count), str(sample.count))
    if sample.position:
        known["position"] = (PLACES[sample.position], sample.position)
    if sample.text:
        known["text"] = (sample.text, sample.text)
    by_answer = {answer: (attribute, value) for attribute, (answer, value) in known.items()}
    return [(by_answer[answer][0], question, by_answer[answer][1]) for question, answer in sample.qa
            if answer in by_answer]


def signature(sample: Sample) -> tuple[object, ...]:
    """What a caption may say about a sample; two samples with one signature may share a caption."""
    return sample.kind, sample.colour, sample.shape, sample.count, sample.position, sample.text


def match_candidates(sample: Sample, pool: Sequence[Sample], num_distractors: int,
                     rng: random.Random) -> tuple[list[str], int]:
    """(captions in a shuffled order, index of the true one): the sample's caption and ``num_distractors``
    distinct captions of pool samples with another signature."""
    others = [s for s in pool if signature(s) != signature(sample)]
    rng.shuffle(others)
    captions = [sample.caption]
    for other in others:
        if other.caption not in captions:
            captions.append(other.caption)
        if len(captions) == num_distractors + 1:
            break
    if len(captions) < num_distractors + 1:
        raise ValueError(f"the pool has too few samples unlike sample {sample.index} for {num_distractors} distractors")
    rng.shuffle(captions)
    return captions, captions.index(sample.caption)
