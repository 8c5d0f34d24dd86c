"""Vision quality of a model, measured through the server over the Realtime protocol. Prints; never asserts.

    python -m bench.vision_eval [--model model.toml] [--quantize nf4|none] [--url ws://HOST:PORT/v1/realtime]
                                [--count 200] [--seed 90001] [--digits N] [--skip-text]
                                [--text-config "temperature=0,max_output_tokens=256"] [--connections 4]
                                [--jsonl FILE]

Held-out data, made fresh in a temporary directory on every run:

- ``--count`` synthetic images from :func:`assistant.data.synth.write_synth` with
  ``--seed`` (default 90001). **Training commands must never use seed 90001**
  (``assistant data synth --seed``): these images and their attributes would then be
  training data, and the figures would measure memory instead of vision;
- the held-out handwritten digits (:func:`assistant.data.digits.write_digits`, split
  ``heldout``: 359 scans no training split contains), or the first ``--digits N``.

The model is served in-process as ``assistant serve`` builds it (``--model``,
``--quantize``, by default the server's: the default vision model, nf4; the data dir
of the environment; a throw-away SQLite store), or
``--url`` names a running server (then ``--model``/``--quantize`` say what it serves;
without ``--model`` the text-only baselines are skipped).

Every question is one out-of-band ``response.create`` (``conversation: "none"``) whose
``input`` is one user message: the image as a ``data:`` URL at detail "high" (what
training uses), then the question; temperature 0, at most 32 output tokens (64 for
captions), the server's system prompt. Questions run on ``--connections``
connections at once, so the engine batches them. Metrics (scored by
:mod:`bench.vision_checks`, which defines "correct" exactly):

- colour, shape, count, position, and the word/number of text images: the synthetic
  set's own ``qa.json`` questions; right when the first value of the attribute named
  in the answer is the expected one;
- digit: the digits' ``qa.json`` question ("What digit is this?", ...), scored the same way;
- caption: "Describe this image." names the colour and the shape (or word/number);
- matching top-1: the extension event ``image.match`` with 5 candidate captions (the
  true one and 4 of samples with other content); right when the true one ranks first.
  A server without the event (error ``unknown_event_type``) gets "n/a";
- text-only (unless ``--skip-text``): the questions of :mod:`bench.quality`, scored by
  its ``good`` (the expected fact, not degenerate, not capped), answered by (a) the
  model under test, (b) its decoder alone with the same ``--quantize`` (no vision
  part, no LoRA adapter) and (c) that decoder unquantized (only when ``--quantize``
  is not none). (a) against (b) is what vision training cost; (b) against (c) what
  quantization cost. Only for a composition file: a LLaVA checkpoint has no separate
  decoder to serve.

The table puts the goals of issue 7 beside the figures; ``--jsonl`` keeps every image
question with its answer and verdict. Cost: every synthetic image takes 3–4 questions
and a caption; on two shared CPU cores, EfficientNet-Lite0 + SmolLM2-135M answered
``--count 20 --digits 20`` (93 questions, 20 matches) and the text-only questions of
three servers in about 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from assistant.config import QUANTIZE_CHOICES
from assistant.data.digits import QUESTIONS as DIGIT_QUESTIONS
from assistant.data.digits import write_digits
from assistant.data.synth import Sample, plan_sample, write_synth
from bench.serving import serving
from bench.vision_checks import attribute_questions, is_correct, match_candidates, names_image

HELD_OUT_SEED = 90001  # training must never use this seed (see the module docstring)
DETAIL = "high"  # the detail training encodes images at (assistant.training.examples.TRAIN_DETAIL)
MAX_ANSWER_TOKENS = 32
MAX_CAPTION_TOKENS = 64
DESCRIBE = "Describe this image."
NUM_DISTRACTORS = 4
METRIC_NAMES = {"colour": "colour", "shape": "shape", "count": "count", "position": "position",
                "digit": "digit (handwritten)", "text": "word/number (text images)",
                "caption": "caption names colour + shape/word", "matching": "matching top-1 of 5"}
GOALS = {"colour": 0.95, "shape": 0.90, "count": 0.70, "position": 0.80, "digit": 0.85, "matching": 0.90}
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """One question about one held-out image and what was answered."""

    image: str  # "synth/images/000012.png", "digits/images/digit-0345.png"
    metric: str  # colour, shape, count, position, text, digit, caption, matching
    question: str
    expected: str
    answer: str
    is_correct: bool


# ------------------------------------------------------------ held-out data


@dataclass(frozen=True)
class HeldOut:
    root: Path
    samples: list[Sample]
    digits: list[dict[str, Any]]  # meta.jsonl rows: index, image, label

    def data_url(self, relative: str) -> str:
        return "data:image/png;base64," + base64.b64encode((self.root / relative).read_bytes()).decode("ascii")


def make_held_out(root: Path, count: int, seed: int, num_digits: int | None) -> HeldOut:
    samples = write_synth(root / "synth", count, seed)
    write_digits(root / "digits", "heldout")
    digits = [json.loads(line) for line in (root / "digits" / "meta.jsonl").read_text().splitlines()]
    return HeldOut(root, samples, digits[:num_digits])


# ------------------------------------------------------------ asking


def image_message(data_url: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user",
            "content": [{"type": "input_image", "image_url": data_url, "detail": DETAIL},
                        {"type": "input_text", "text": text}]}


async def reply(conn: ClientConnection, event: dict[str, Any], until: str) -> dict[str, Any]:
    """Send ``event`` and return the first event of type ``until`` or ``error``."""
    await conn.send(json.dumps(event))
    while True:
        answer = json.loads(await conn.recv())
        if answer["type"] in (until, "error"):
            return answer


async def ask_image(conn: ClientConnection, data_url: str, question: str, max_output_tokens: int) -> str:
    response = {"conversation": "none", "output_modalities": ["text"], "temperature": 0.0,
                "max_output_tokens": max_output_tokens, "input": [image_message(data_url, question)]}
    event = await reply(conn, {"type": "response.create", "response": response}, "response.done")
    if event["type"] == "error":
        raise RuntimeError(f"server error: {event['error'].get('code')}: {event['error'].get('message')}")
    done = event["response"]
    if done["status"] == "failed":
        raise RuntimeError(f"response failed: {done['status_details']}")
    return "".join(part.get("text", "") for item in done["output"] for part in item.get("content", []))


async def match(conn: ClientConnection, data_url: str, texts: list[str]) -> dict[str, Any]:
    """``image.match.result``, or the ``error`` event the server answered instead."""
    event = {"type": "image.match", "image": {"image_url": data_url, "detail": DETAIL}, "texts": texts}
    return await reply(conn, event, "image.match.result")


async def run_jobs(url: str, jobs: list[Callable[[ClientConnection], Awaitable[T]]], num_connections: int) -> list[T]:
    """Each job once, on ``num_connections`` connections at once (one job at a time per connection); in order."""
    results: list[Any] = [None] * len(jobs)
    pending = iter(enumerate(jobs))  # shared: each worker takes the next job when it is free

    async def worker() -> None:
        async with connect(url, max_size=None) as conn:
            await conn.recv()  # session.created
            for index, job in pending:
                results[index] = await job(conn)

    await asyncio.gather(*(worker() for _ in range(min(num_connections, len(jobs)))))
    return results


def question_jobs(data: HeldOut) -> list[Callable[[ClientConnection], Awaitable[Check]]]:
    def job(image: str, metric: str, question: str, expected: str, max_tokens: int,
            score: Callable[[str], bool]) -> Callable[[ClientConnection], Awaitable[Check]]:
        async def run(conn: ClientConnection) -> Check:
            answer = await ask_image(conn, data.data_url(image), question, max_tokens)
            return Check(image, metric, question, expected, answer, score(answer))
        return run

    jobs = []
    for sample in data.samples:
        image = f"synth/{sample.image_name}"
        for attribute, question, expected in attribute_questions(sample):
            jobs.append(job(image, attribute, question, expected, MAX_ANSWER_TOKENS,
                            lambda answer, a=attribute, e=expected: is_correct(answer, a, e)))
        jobs.append(job(image, "caption", DESCRIBE, sample.caption, MAX_CAPTION_TOKENS,
                        lambda answer, s=sample: names_image(answer, s)))
    for digit in data.digits:
        question, label = DIGIT_QUESTIONS[digit["index"] % len(DIGIT_QUESTIONS)], str(digit["label"])
        jobs.append(job(f"digits/{digit['image']}", "digit", question, label, MAX_ANSWER_TOKENS,
                        lambda answer, e=label: is_correct(answer, "digit", e)))
    return jobs


async def matching_checks(url: str, data: HeldOut, seed: int, num_connections: int) -> tuple[list[Check], str]:
    """Top-1 checks of ``image.match``, or none and the error code when the server does not answer it."""
    pool = [plan_sample(seed, index) for index in range(len(data.samples) + 64)]  # captions only, no pixels
    candidates = [match_candidates(s, pool, NUM_DISTRACTORS, random.Random(f"match:{seed}:{s.index}"))
                  for s in data.samples]

    def job(sample: Sample, texts: list[str], true_index: int) -> Callable[[ClientConnection], Awaitable[Check]]:
        async def run(conn: ClientConnection) -> Check:
            result = await match(conn, data.data_url(f"synth/{sample.image_name}"), texts)
            if result["type"] == "error":
                raise RuntimeError(f"image.match: {result['error'].get('code')}: {result['error'].get('message')}")
            best = result["ranking"][0]
            return Check(f"synth/{sample.image_name}", "matching", " | ".join(texts), sample.caption,
                         texts[best], best == true_index)
        return run

    async with connect(url, max_size=None) as conn:  # one probe: does this server know image.match?
        await conn.recv()
        first = data.samples[0]
        probe = await match(conn, data.data_url(f"synth/{first.image_name}"), candidates[0][0])
    if probe["type"] == "error":
        return [], str(probe["error"].get("code"))
    jobs = [job(s, texts, true_index) for s, (texts, true_index) in zip(data.samples, candidates)]
    return await run_jobs(url, jobs, num_connections), ""


# ------------------------------------------------------------ serving


@asynccontextmanager
async def model_url(args: argparse.Namespace) -> AsyncIterator[str]:
    if args.url:
        yield args.url
    else:
        label = f"served  {args.model} ({args.quantize})"
        async with serving(label, model=args.model, quantize=args.quantize) as url:
            yield url


def decoder_of(model: str | None) -> tuple[str | None, str]:
    """The decoder of a composition file (its vision part and adapter left out), or None and why not."""
    from assistant.engine.composition import load_composition
    from assistant.models import DEFAULT_MODEL, VISION_MODEL_FILE

    if model is None:
        return None, "no --model given"
    model = str(VISION_MODEL_FILE) if model == DEFAULT_MODEL else model
    if not model.endswith(".toml"):
        return None, "not a composition file"

    return load_composition(Path(model).expanduser()).decoder, ""


# ------------------------------------------------------------ text-only


@dataclass(frozen=True)
class TextResult:
    label: str
    num_good: int = 0
    num_fact: int = 0
    num_answers: int = 0
    note: str = ""

    @property
    def share(self) -> float | None:
        return self.num_good / self.num_answers if self.num_answers else None


async def text_only(url: str, label: str, spec: str, seeds: int, num_connections: int) -> TextResult:
    try:
        from bench.quality import ask, parse_config
        from bench.quality_questions import QUESTIONS
    except ImportError as exc:
        return TextResult(label, note=f"bench.quality not importable: {exc}")
    config = parse_config(spec, None, 256)
    jobs = [lambda conn, q=question, s=seed: ask(conn, q, config, s)
            for seed in range(1 if config.is_greedy else seeds) for question in QUESTIONS]
    started = time.perf_counter()
    answers = await run_jobs(url, jobs, num_connections)
    print(f"text    {label}: {len(answers)} answers in {time.perf_counter() - started:.0f} s", flush=True)
    return TextResult(label, sum(a.is_good for a in answers), sum(a.has_fact for a in answers), len(answers),
                      f"fact {100 * sum(a.has_fact for a in answers) / len(answers):.0f} %")


# ------------------------------------------------------------ report


def percent(num: int, total: int) -> str:
    return f"{100 * num / total:5.1f} %" if total else "  n/a"


def met(share: float | None, goal: float | None) -> str:
    return "" if share is None or goal is None else ("yes" if share >= goal else "no")


Row = tuple[str, str, str, str, str]  # metric, value, n, goal, met


def vision_rows(checks: list[Check], matching_problem: str) -> list[Row]:
    rows = []
    for metric, name in METRIC_NAMES.items():
        mine = [c for c in checks if c.metric == metric]
        num_correct = sum(c.is_correct for c in mine)
        value = f"  n/a ({matching_problem})" if metric == "matching" and matching_problem else percent(
            num_correct, len(mine))
        goal = GOALS.get(metric)
        rows.append((name, value, str(len(mine)), f">= {100 * goal:.0f} %" if goal else "",
                     met(num_correct / len(mine) if mine else None, goal)))
    return rows


def text_rows(results: list[TextResult]) -> list[Row]:
    """One row per model; the model under test (the first) has the decoder alone (the second) as its goal."""
    rows = []
    for index, result in enumerate(results):
        baseline = results[1] if index == 0 and len(results) > 1 else None
        value = f"{percent(result.num_good, result.num_answers)}  {result.note}".rstrip()
        if not result.num_answers:
            value = f"  {result.note}"
        rows.append((f"text-only good: {result.label}", value,
                     str(result.num_answers), "no worse than (b)" if baseline else "",
                     met(result.share, baseline.share) if baseline else ""))
    return rows


def print_table(rows: list[Row]) -> None:
    header = ("metric", "value", "n", "goal", "met")
    widths = [max(len(row[i]) for row in (*rows, header)) for i in range(len(header))]
    for row in (header, *rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
              f"{row[3]:<{widths[3]}}  {row[4]}".rstrip())


async def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_held_out(Path(tmp), args.count, args.seed, args.digits)
        print(f"data    {len(data.samples)} synthetic images (seed {args.seed}), {len(data.digits)} held-out digits, "
              f"made in {time.perf_counter() - started:.0f} s", flush=True)
        text: list[TextResult] = []
        async with model_url(args) as url:
            phase = time.perf_counter()
            checks = await run_jobs(url, question_jobs(data), args.connections)
            print(f"vision  {len(checks)} questions in {time.perf_counter() - phase:.0f} s", flush=True)
            phase = time.perf_counter()
            matches, matching_problem = await matching_checks(url, data, args.seed, args.connections)
            print(f"match   {len(matches)} images in {time.perf_counter() - phase:.0f} s"
                  f"{f' (server: {matching_problem})' if matching_problem else ''}", flush=True)
            checks += matches
            if not args.skip_text:
                text.append(await text_only(url, f"(a) model, {args.quantize}", args.text_config, args.text_seeds,
                                            args.connections))
        if not args.skip_text:
            decoder, why_not = decoder_of(args.model)
            quantizations = [args.quantize, "none"] if args.quantize != "none" else ["none"]
            for label, quantize in zip(("(b) decoder alone", "(c) decoder alone"), quantizations):
                if decoder is None:
                    text.append(TextResult(f"{label}, {quantize}", note=f"n/a: {why_not}"))
                    continue
                async with serving(f"served  {decoder} ({quantize})", model=decoder, quantize=quantize) as url:
                    text.append(await text_only(url, f"{label}, {quantize}", args.text_config, args.text_seeds,
                                                args.connections))
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as file:
                file.writelines(json.dumps(asdict(check)) + "\n" for check in checks)
    print(f"\n{args.model or args.url} ({args.quantize}), {time.perf_counter() - started:.0f} s in all")
    print_table(vision_rows(checks, matching_problem) + text_rows(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="what to serve in-process (a composition file, a LLaVA checkpoint; default: "
                                        "the server's default model); with --url: what that server serves")
    parser.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES,
                        help="of the decoder (default auto, as the server's)")
    parser.add_argument("--url", help="a running server's Realtime URL instead of an in-process one")
    parser.add_argument("--count", type=int, default=200, help="synthetic held-out images (default 200)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="synthetic set seed; never a training seed")
    parser.add_argument("--digits", type=int, help="the first N held-out digits (default: all 359)")
    parser.add_argument("--skip-text", action="store_true", help="skip the text-only questions")
    parser.add_argument("--text-config", default="temperature=0",
                        help="bench.quality --config of the text-only questions (default: greedy, 256 tokens)")
    parser.add_argument("--text-seeds", type=int, default=1, help="seeds per text-only question unless greedy")
    parser.add_argument("--connections", type=int, default=4, help="questions asked at once (default 4)")
    parser.add_argument("--jsonl", help="append every image question and its answer to this file as JSON lines")
    args = parser.parse_args()
    if not args.url and not args.model:
        from assistant.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    if args.count < 1 or args.connections < 1 or args.text_seeds < 1 or (args.digits is not None and args.digits < 0):
        sys.exit("--count, --connections and --text-seeds must be >= 1, --digits >= 0")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
