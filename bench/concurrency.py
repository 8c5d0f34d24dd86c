"""Many conversations on one engine: aggregate decode throughput and time to first token. Prints; never asserts.

    python -m bench.concurrency [--model SPEC] [--quantize auto|nf4|int8-cpu|none] [--dtype bfloat16] [--tokens 48]
                                [--concurrency 1,4,8] [--turns 10]

The model is loaded as ``assistant serve`` loads it (by default the default model, ``--quantize auto``);
the engine runs in-process on its own thread, as in the server (no sockets: this
measures the engine, batching and KV reuse, not the protocol).

- aggregate tokens/s: N requests (different questions asking for long answers)
  started together, each generating greedily up to ``--tokens`` tokens (fewer if
  it ends on its own); the tokens generated divided by the wall time, against
  one request alone; and the slowest request's own tokens/s;
- time to first token at turn 1 and at turn ``--turns`` of one conversation whose
  history grows by each answer and a new question, with KV reuse across turns
  (``kv_cache_bytes`` 256 MiB) and without (0).

Machines are shared and noisy: compare ratios within one run, not absolutes.
"""

from __future__ import annotations

import argparse
import threading
import time

from assistant.cli import configure_logging
from assistant.config import QUANTIZE_CHOICES, load_config
from assistant.engine.engine import Engine
from assistant.engine.prefix_cache import PrefixCache
from assistant.engine.loader import load_model, pick_device, pick_quantize
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk, TokenDelta
from assistant.engine.sampling import SamplingParams

QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through Paris from morning to night.",
    "List twenty animals and say one thing about each.",
    "Explain photosynthesis to a ten-year-old, step by step.",
    "Write a letter to a friend about your summer holidays.",
    "Describe how to bake bread, from flour to the first slice.",
    "Tell me the history of the printing press in detail.",
]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Give an example.", "And then?", "Summarize that.",
              "What else?", "Explain it differently.", "Is that always true?", "Go on.", "Anything else?"]


def user(text: str) -> ChatMessage:
    return ChatMessage("user", (TextChunk(text),))


class Run:
    """One request's timings, filled in by its sink on the engine thread."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.text: list[str] = []
        self.finished: Finished | None = None
        self.done = threading.Event()

    def sink(self, event: EngineEvent) -> None:
        if isinstance(event, TokenDelta):
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self.text.append(event.text)
        elif isinstance(event, Finished):
            self.finished = event
            self.ended = time.perf_counter()
            self.done.set()


def generate(engine: Engine, request_id: str, messages: tuple[ChatMessage, ...], tokens: int) -> Run:
    run = Run()
    engine.add_request(GenerationRequest(request_id, messages, SamplingParams(temperature=0.0,
                                                                              max_output_tokens=tokens)), run.sink)
    return run


def throughput(engine: Engine, concurrency: int, tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    runs = [generate(engine, f"c{concurrency}-{i}", (user(QUESTIONS[i % len(QUESTIONS)]),), tokens)
            for i in range(concurrency)]
    for run in runs:
        run.done.wait()
    wall = time.perf_counter() - started
    total = sum(run.finished.num_output_tokens for run in runs if run.finished)
    slowest = min(run.finished.num_output_tokens / (run.ended - run.started) for run in runs if run.finished)
    return total / wall, slowest


def first_token_times(engine: Engine, turns: int) -> list[float]:
    history: tuple[ChatMessage, ...] = (user(QUESTIONS[0]),)
    times = []
    for turn in range(turns):
        run = generate(engine, f"t{turn}-{time.monotonic_ns()}", history, 24)
        run.done.wait()
        assert run.first_token is not None
        times.append(run.first_token - run.started)
        history += (ChatMessage("assistant", (TextChunk("".join(run.text) or "ok"),)),
                    user(FOLLOW_UPS[turn % len(FOLLOW_UPS)]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES)
    parser.add_argument("--dtype")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    configure_logging("warning")
    overrides = {k: v for k, v in {"model": args.model, "quantize": args.quantize, "dtype": args.dtype}.items() if v}
    config = load_config(overrides, env={})
    began = time.perf_counter()
    levels = [int(n) for n in args.concurrency.split(",")]
    # As the server does it: the model is loaded on the engine's own thread (Engine.start_loaded).
    engine = Engine.start_loaded(lambda: load_model(config, progress=lambda _: None),
                                 max_num_running=max(levels), kv_cache_bytes=0)
    quantize = pick_quantize(config.quantize, pick_device(config.device))
    print(f"model   {config.model} (quantize {config.quantize}: {quantize}, {config.dtype}), loaded in "
          f"{time.perf_counter() - began:.1f} s")
    try:
        throughput(engine, 1, 8)  # warm-up
        single = None
        for n in levels:
            aggregate, slowest = throughput(engine, n, args.tokens)
            single = single or aggregate
            print(f"decode  {n:2d} concurrent   {aggregate:7.1f} tok/s aggregate ({aggregate / single:4.2f}x one), "
                  f"slowest stream {slowest:6.1f} tok/s")
        for label, budget in (("KV reuse", 256 << 20), ("no reuse", 0)):
            # The engine is idle between runs: its thread does not touch the prefix cache now.
            engine.prefix_cache = PrefixCache(budget, engine.model.new_cache)
            times = first_token_times(engine, args.turns)
            print(f"ttft    {label:9s} turn 1 {times[0] * 1000:7.0f} ms, turn {args.turns} {times[-1] * 1000:7.0f} ms "
                  f"({times[-1] / times[0]:4.2f}x turn 1)")
    finally:
        engine.shutdown()

if __name__ == "__main__":
    main()
