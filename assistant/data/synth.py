"""Synthetic images whose content is known, with captions and question–answer pairs.

Three kinds of scene, each drawn on a 224×224 canvas (EfficientNet-Lite0's input):

- ``shape``: one shape (circle, square, triangle, star) of one colour and size at one of
  five positions;
- ``count``: 1–4 shapes of one kind and colour, scattered without overlap;
- ``text``: a short word or a number rendered in one colour.

Backgrounds are plain or a vertical gradient, always far from the drawn colour, with
optional pixel noise. Every sample is generated from ``random.Random(f"{seed}:{index}")``
alone, so a data set is deterministic per seed and a larger ``count`` only adds samples.

:func:`write_synth` writes ``images/NNNNNN.png`` and three files: ``captions.json``
(one "describe" turn per image: the alignment stage), ``qa.json`` (one entry per question,
several per image: the instruction stage), both in LLaVA's format, and ``meta.jsonl`` (each sample's
attributes, for evaluation).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 224
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (35, 70, 225), "yellow": (245, 210, 25),
    "orange": (245, 130, 20), "purple": (140, 50, 175), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "light grey": (200, 200, 200), "black": (15, 15, 15), "beige": (235, 220, 190),
    "dark grey": (70, 70, 70), "light blue": (190, 215, 240),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
}
PLACES = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom"}
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}  # radius as a share of the canvas
WORDS = ("cat", "dog", "sun", "stop", "open", "hello", "tree", "book", "moon", "fish", "car", "home")
NUMBER_WORDS = ("one", "two", "three", "four")
KINDS = ("shape", "count", "text")
DESCRIBE_PROMPTS = ("Describe this image.", "What is in this picture?", "Give a short caption for this image.",
                    "What do you see?", "Describe the picture briefly.")


@dataclass(frozen=True)
class Sample:
    """One generated image's known content, caption and questions (answers are short and exact)."""

    index: int
    kind: str
    colour: str
    background: str
    shape: str | None = None
    count: int = 1
    position: str | None = None
    size: str | None = None
    text: str | None = None
    caption: str = ""
    qa: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def image_name(self) -> str:
        return f"images/{self.index:06d}.png"


def _background_for(colour: str, rng: random.Random) -> str:
    """A background far enough from ``colour`` that the shape stays visible."""
    target = np.array(COLOURS[colour])
    choices = [name for name, rgb in BACKGROUNDS.items() if np.abs(np.array(rgb) - target).sum() > 200]
    return rng.choice(choices)


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def plan_sample(seed: int, index: int) -> Sample:
    """What sample ``index`` of data set ``seed`` shows (no pixels yet)."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choice(KINDS)
    colour = rng.choice(list(COLOURS))
    background = _background_for(colour, rng)
    if kind == "shape":
        shape, position, size = rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(list(SIZES))
        where = PLACES[position]
        caption = rng.choice([f"A {size} {colour} {shape} {where} on a {background} background.",
                              f"A {colour} {shape} {where}.",
                              f"There is a {size} {colour} {shape} {where}."])
        qa = ((f"What colour is the {shape}?", colour), ("What shape is it?", shape),
              (f"Where is the {shape}?", where),
              (f"Is the {shape} small or large?", size))
        return Sample(index, kind, colour, background, shape=shape, position=position, size=size,
                      caption=caption, qa=qa)
    if kind == "count":
        shape, count = rng.choice(SHAPES), rng.randint(1, 4)
        things = f"{NUMBER_WORDS[count - 1]} {colour} {_plural(shape, count)}"
        caption = rng.choice([f"{things.capitalize()} on a {background} background.",
                              f"The image shows {things}.", f"There {'is' if count == 1 else 'are'} {things}."])
        qa = ((f"How many {_plural(shape, 2)} are there?", str(count)),
              (f"What colour are the {_plural(shape, 2)}?", colour), ("What shape are they?", shape))
        return Sample(index, kind, colour, background, shape=shape, count=count, caption=caption, qa=qa)
    text = rng.choice(WORDS) if rng.random() < 0.6 else str(rng.randint(0, 99))
    caption = rng.choice([f'The {"word" if text.isalpha() else "number"} "{text}" written in {colour}.',
                          f'{colour.capitalize()} text that reads "{text}".'])
    qa = (("What does the text say?", text), ("What colour is the text?", colour))
    return Sample(index, kind, colour, background, text=text, caption=caption, qa=qa)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * math.cos(math.pi / 6), cy + r / 2), (cx - r * math.cos(math.pi / 6), cy + r / 2)]
    # star: five points, inner radius 0.45 r
    return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rgb: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=rgb)


def _scatter(count: int, r: float, rng: random.Random) -> list[tuple[float, float]]:
    """``count`` centres inside the canvas whose shapes of radius ``r`` do not overlap."""
    while True:
        centres: list[tuple[float, float]] = []
        for _ in range(200):
            x, y = rng.uniform(r + 4, SIZE - r - 4), rng.uniform(r + 4, SIZE - r - 4)
            if all(math.dist((x, y), c) > 2.3 * r for c in centres):
                centres.append((x, y))
                if len(centres) == count:
                    return centres


def render(sample: Sample, seed: int) -> Image.Image:
    """The sample's pixels (deterministic for ``seed`` and ``sample.index``)."""
    rng = random.Random(f"{seed}:{sample.index}:pixels")
    bg = np.array(BACKGROUNDS[sample.background], dtype=np.float32)
    canvas = np.broadcast_to(bg, (SIZE, SIZE, 3)).copy()
    if rng.random() < 0.3:  # a gentle vertical gradient
        canvas *= np.linspace(0.85, 1.1, SIZE, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    rgb = COLOURS[sample.colour]
    if sample.kind == "shape":
        assert sample.shape and sample.position and sample.size
        fx, fy = POSITIONS[sample.position]
        jitter = SIZE * 0.03
        _draw_shape(draw, sample.shape, fx * SIZE + rng.uniform(-jitter, jitter),
                    fy * SIZE + rng.uniform(-jitter, jitter), SIZES[sample.size] * SIZE, rgb)
    elif sample.kind == "count":
        assert sample.shape
        r = SIZE * rng.uniform(0.07, 0.1)
        for cx, cy in _scatter(sample.count, r, rng):
            _draw_shape(draw, sample.shape, cx, cy, r, rgb)
    else:
        assert sample.text
        font = ImageFont.load_default(size=rng.randint(44, 64) if len(sample.text) <= 4 else 40)
        left, top, right, bottom = draw.textbbox((0, 0), sample.text, font=font)
        x = (SIZE - (right - left)) / 2 - left + rng.uniform(-10, 10)
        y = (SIZE - (bottom - top)) / 2 - top + rng.uniform(-10, 10)
        draw.text((x, y), sample.text, fill=rgb, font=font)
    if rng.random() < 0.5:  # sensor-like noise
        noise = np.random.default_rng([seed, sample.index]).normal(0, rng.uniform(3, 12), (SIZE, SIZE, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image


def caption_conversation(sample: Sample, prompt: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": sample.caption}]


def qa_conversations(sample: Sample) -> list[list[dict[str, str]]]:
    """One single-turn conversation per question: asked together, an earlier question would give a later answer
    away ("What colour is the star?" before "What shape is it?"), and a served question usually comes first."""
    return [[{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            for question, answer in sample.qa]


def write_synth(out: Path, count: int, seed: int) -> list[Sample]:
    """Generate ``count`` samples of data set ``seed`` into ``out`` (see the module docstring)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = [plan_sample(seed, index) for index in range(count)]
    captions, qa = [], []
    for sample in samples:
        render(sample, seed).save(out / sample.image_name, format="PNG")
        prompt = random.Random(f"{seed}:{sample.index}:prompt").choice(DESCRIBE_PROMPTS)
        captions.append({"id": f"synth-{seed}-{sample.index}", "image": sample.image_name,
                         "conversations": caption_conversation(sample, prompt)})
        qa.extend({"id": f"synth-{seed}-{sample.index}-q{number}", "image": sample.image_name,
                   "conversations": conversation} for number, conversation in enumerate(qa_conversations(sample)))
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    (out / "qa.json").write_text(json.dumps(qa, indent=1) + "\n")
    with (out / "meta.jsonl").open("w") as meta:
        for sample in samples:
            meta.write(json.dumps({**asdict(sample), "image": sample.image_name, "seed": seed}) + "\n")
    return samples
