"""Answer quality of sampling configurations over the real server. Prints; never asserts.

    python -m bench.quality [--config "temperature=0.3,top_p=0.9,frequency_penalty=0.3"]...
                            [--system-prompt-file FILE] [--seeds 3] [--max-output-tokens 256]
                            [--url ws://HOST:PORT/v1/realtime] [--model SPEC] [--quantize KIND]
                            [--jsonl FILE] [--show-bad]
    python -m bench.quality --rescore FILE [--show-bad]     # score a --jsonl file's answers again

Asks every question of :mod:`bench.quality_questions` (capitals, simple science,
arithmetic, common knowledge, definitions, a how-to) over the Realtime protocol, one
``response.create`` per answer with ``conversation: "none"`` (each question alone, after
the system prompt), once per seed (``seed`` 0, 1, ...; a greedy configuration,
``temperature=0``, runs seed 0 only: its answers do not depend on the seed), for each
``--config``. The server is started in-process as ``assistant serve`` builds it (its
data dir, hence its model; a throw-away SQLite store), unless ``--url`` names one.

A ``--config`` is ``key=value`` pairs: ``temperature``, ``top_p``, ``frequency_penalty``,
``presence_penalty``, ``repetition_penalty``, ``max_output_tokens`` (sent in each
``response.create``; keys left out take the server's defaults) and ``system_prompt``
(a file whose text is sent as ``instructions``; default ``--system-prompt-file``, else
the server's). No ``--config``: one run on the server's defaults.

Per configuration it prints:

- ``fact``: share of answers containing the expected fact (see the questions module);
- ``degen``: share that degenerate into repetition (below);
- ``capped``: share that hit ``max_output_tokens`` (status ``incomplete``);
- ``good``: share with the fact, not degenerate and not capped, the figure to rank by;
- median output tokens, median seconds per answer and their sum (requests run one at
  a time, so the sum is the configuration's wall time).

Degenerate, concretely: lower-cased words (a number such as ``1,000.5`` is one word)
that contain either

- a *loop*: a run of 1 to 8 words repeated 3+ times back to back
  ("la Révolution, la Révolution, la Révolution", "Boil an egg: Boil an egg: Boil an
  egg:"), or
- a *recycled phrase*: some word 4-gram occurring 3+ times anywhere
  ("Paris is known for its art. Paris is known for its food. Paris is known for its
  fashion." — the looping lists and going-in-circles paragraphs a small model falls into).

Runs and 4-grams made only of numbers do not count ("9 * 9 * 9" is arithmetic, if
wrong), nor do 4-grams of the question itself: prose about "the first president of
the United States" may name "the United States" three times. Normal prose of a few
hundred tokens, lists included, rarely repeats any other 4-gram three times; the
definition was checked against this bench's own answers (``--show-bad``).

Sampling is seeded, so a run is reproducible on one machine; the wall times are
not (shared machines): compare them within one run. On a CPU that other jobs share,
``OMP_NUM_THREADS=1`` keeps torch's threads from waiting on each other (decode was
~14 tok/s with one thread and under 2 tok/s with two on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from assistant.config import QUANTIZE_CHOICES
from assistant.engine.sampling import check_sampling_value
from bench.serving import run_response, serving
from bench.quality_questions import QUESTIONS, Question

QUESTION_BY_TEXT = {q.text: q for q in QUESTIONS}

FLOAT_KEYS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
MAX_LOOP_WORDS = 8
MIN_LOOP_COPIES = 3
NGRAM = 4
MIN_NGRAM_COUNT = 3
WORD = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:['’]\w+)*")


# ------------------------------------------------------------ degeneration


def words_of(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def is_number(word: str) -> bool:
    return word[0].isdigit()


def has_loop(words: list[str], max_period: int = MAX_LOOP_WORDS, min_copies: int = MIN_LOOP_COPIES) -> bool:
    """Whether some run of 1..max_period words, not all numbers, repeats ``min_copies`` times back to back."""
    for period in range(1, max_period + 1):
        matching = 0  # consecutive positions i with words[i] == words[i - period]
        for i in range(period, len(words)):
            matching = matching + 1 if words[i] == words[i - period] else 0
            if matching >= period * (min_copies - 1) and not all(map(is_number, words[i - period + 1:i + 1])):
                return True
    return False


def has_recycled_phrase(words: list[str], question_words: list[str], n: int = NGRAM,
                        min_count: int = MIN_NGRAM_COUNT) -> bool:
    """Whether some n-gram, not all numbers and not the question's own words, occurs ``min_count`` times."""
    def ngrams(ws: list[str]) -> Counter[tuple[str, ...]]:
        return Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))

    asked = ngrams(question_words)
    return any(count >= min_count and gram not in asked and not all(map(is_number, gram))
               for gram, count in ngrams(words).items())


def degenerates(text: str, question: str = "") -> bool:
    words = words_of(text)
    return has_loop(words) or has_recycled_phrase(words, words_of(question))


# ------------------------------------------------------------ configurations


@dataclass(frozen=True)
class RunConfig:
    label: str
    sampling: dict[str, Any]  # sent in each response.create
    instructions: str | None  # None: the server's system prompt

    @property
    def is_greedy(self) -> bool:
        return self.sampling.get("temperature") == 0.0


def parse_config(spec: str, default_system_prompt: str | None, max_output_tokens: int) -> RunConfig:
    sampling: dict[str, Any] = {"max_output_tokens": max_output_tokens}
    system_prompt = default_system_prompt
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise SystemExit(f"--config {spec!r}: expected key=value, got {pair!r}")
        if key == "system_prompt":
            system_prompt = value
            continue
        if key not in (*FLOAT_KEYS, "max_output_tokens"):
            raise SystemExit(f"--config {spec!r}: unknown key {key!r}; known: {', '.join(FLOAT_KEYS)}, "
                             "max_output_tokens, system_prompt")
        try:
            sampling[key] = int(value) if key == "max_output_tokens" else float(value)
        except ValueError:
            raise SystemExit(f"--config {spec!r}: {key} expects a number, got {value!r}") from None
        problem = check_sampling_value(key, sampling[key])
        if problem:
            raise SystemExit(f"--config {spec!r}: {key} {problem}")
    instructions = Path(system_prompt).read_text(encoding="utf-8").strip() if system_prompt else None
    return RunConfig(spec or "server defaults", sampling, instructions)


# ------------------------------------------------------------ asking


@dataclass(frozen=True)
class Answer:
    """One reply as it came back; its scores are derived, so stored answers can be scored again (--rescore)."""

    config: str
    question: str
    seed: int
    text: str
    status: str
    num_output_tokens: int
    seconds: float

    @property
    def has_fact(self) -> bool:
        return QUESTION_BY_TEXT[self.question].is_answered_by(self.text)

    @property
    def is_degenerate(self) -> bool:
        return degenerates(self.text, self.question)

    @property
    def is_capped(self) -> bool:
        return self.status == "incomplete"

    @property
    def is_good(self) -> bool:
        return self.has_fact and not self.is_degenerate and not self.is_capped


async def ask(conn: ClientConnection, question: Question, config: RunConfig, seed: int) -> Answer:
    response: dict[str, Any] = {"conversation": "none", "output_modalities": ["text"], "seed": seed,
                                **config.sampling,
                                "input": [{"type": "message", "role": "user",
                                           "content": [{"type": "input_text", "text": question.text}]}]}
    if config.instructions is not None:
        response["instructions"] = config.instructions
    done, seconds = await run_response(conn, response)
    text = "".join(part.get("text", "") for item in done["output"] for part in item.get("content", []))
    return Answer(config.label, question.text, seed, text, done["status"], done["usage"]["output_tokens"], seconds)


async def ask_all(url: str, config: RunConfig, seeds: list[int]) -> list[Answer]:
    """Every question once per seed (seed 0 only when greedy), one at a time on one connection."""
    answers = []
    async with connect(url, max_size=None) as conn:
        await conn.recv()  # session.created
        for seed in seeds[:1] if config.is_greedy else seeds:
            for question in QUESTIONS:
                answers.append(await ask(conn, question, config, seed))
    return answers


@asynccontextmanager
async def server_url(args: argparse.Namespace) -> AsyncIterator[str]:
    """``--url``, or the URL of an in-process server built as ``assistant serve`` builds it."""
    if args.url:
        yield args.url
        return
    async with serving(f"model   {args.model} (quantize {args.quantize})", model=args.model,
                       quantize=args.quantize) as url:
        yield url


# ------------------------------------------------------------ report


def share(answers: list[Answer], flag: str) -> str:
    return f"{100 * sum(getattr(a, flag) for a in answers) / len(answers):5.0f}%"


def header(width: int) -> str:
    return f"{'config':<{width}}  answers   fact  degen capped   good  tokens(med)  s/answer(med)  total s"


def row(label: str, answers: list[Answer], width: int) -> str:
    a = answers
    return (f"{label:<{width}}  {len(a):7d} {share(a, 'has_fact')} {share(a, 'is_degenerate')}"
            f" {share(a, 'is_capped')} {share(a, 'is_good')}"
            f"  {statistics.median(x.num_output_tokens for x in a):11.0f}"
            f"  {statistics.median(x.seconds for x in a):13.2f}  {sum(x.seconds for x in a):7.0f}")


def print_table(results: dict[str, list[Answer]]) -> None:
    width = max(len("config"), *map(len, results))
    print("\n".join([header(width), *(row(label, answers, width) for label, answers in results.items())]))


def show_bad(label: str, answers: list[Answer]) -> None:
    print(f"\n--- {label}: answers without the fact, degenerate or capped")
    for a in answers:
        if not a.is_good:
            flags = " ".join(f for f, on in (("no-fact", not a.has_fact), ("degen", a.is_degenerate),
                                             ("capped", a.is_capped)) if on)
            print(f"[{flags}] seed {a.seed} {a.question!r}: {' '.join(a.text.split())[:240]!r}")


def read_answers(path: str) -> dict[str, list[Answer]]:
    results: dict[str, list[Answer]] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            answer = Answer(**json.loads(line))
            if answer.question in QUESTION_BY_TEXT:  # questions since removed from the set are not scored
                results.setdefault(answer.config, []).append(answer)
    return results


async def run(args: argparse.Namespace) -> dict[str, list[Answer]]:
    configs = [parse_config(spec, args.system_prompt_file, args.max_output_tokens) for spec in args.config or [""]]
    seeds = list(range(args.seeds))
    print(f"bench   {len(QUESTIONS)} questions x {len(seeds)} seeds (greedy: 1), max_output_tokens "
          f"{args.max_output_tokens}, {len(configs)} configurations, system prompt "
          f"{args.system_prompt_file or 'of the server'}", flush=True)
    width = max(len("config"), *(len(c.label) for c in configs))
    results = {}
    async with server_url(args) as url:
        print(header(width), flush=True)
        for config in configs:
            results[config.label] = answers = await ask_all(url, config, seeds)
            print(row(config.label, answers, width), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a", encoding="utf-8") as file:
                    file.writelines(json.dumps(asdict(answer)) + "\n" for answer in answers)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="key=value,... (repeat for several configurations)")
    parser.add_argument("--system-prompt-file", help="system prompt of configurations without system_prompt=")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per question (greedy: seed 0 only)")
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--url", help="a running server's Realtime URL instead of an in-process one")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model of the in-process server")
    parser.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES, help="its --quantize")
    parser.add_argument("--jsonl", help="append every answer to this file as JSON lines")
    parser.add_argument("--rescore", metavar="JSONL", help="score the answers of a --jsonl file again; ask nothing")
    parser.add_argument("--show-bad", action="store_true", help="print every answer that is not good")
    args = parser.parse_args()
    if args.seeds < 1 or args.max_output_tokens < 1:
        sys.exit("--seeds and --max-output-tokens must be >= 1")
    results = read_answers(args.rescore) if args.rescore else asyncio.run(run(args))
    if args.rescore:
        print_table(results)
    elif len(results) > 1:
        print("\nall configurations")
        print_table(results)
    if args.show_bad:
        for label, answers in results.items():
            show_bad(label, answers)


if __name__ == "__main__":
    main()
