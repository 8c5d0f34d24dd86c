"""What picking a token costs: the sampler on the default model's own logits, and eight conversations through the
engine with greedy picks against the server's default sampling. Prints; never asserts.

    python -m bench.sampling [--quantize auto] [--tokens 64] [--repeats 5]

- ``sample()`` per row (microseconds, best of ``--repeats`` over 300 rounds of eight rows): greedy; greedy with
  a frequency penalty; temperature alone; top-p alone; the server's defaults (temperature 0.3, top_p 0.9,
  frequency_penalty 0.3). The rows are the next-token logits of eight different questions;
- one argmax over the eight rows (what the engine does for a batch's plain greedy rows) against eight;
- eight conversations at once through the engine in-process (``--tokens`` each, the same questions): aggregate
  tok/s greedy and with the server's defaults (seeded), so the sampler's share of a batched step shows.

Machines are shared and noisy: compare figures within one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from assistant.config import load_config
from assistant.engine.engine import Engine
from assistant.engine.loader import load_model
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk
from assistant.engine.sampling import SamplingParams, make_generator, sample
from assistant.models import DEFAULT_DECODER, default_data_dir
from bench.decode import best_of
from bench.llama_cpp import QUESTIONS

DEFAULTS = {"temperature": 0.3, "top_p": 0.9, "frequency_penalty": 0.3}  # the server's (assistant/config.py)
CASES = {"greedy": {"temperature": 0.0}, "greedy + frequency_penalty 0.3": {"temperature": 0.0,
                                                                           "frequency_penalty": 0.3},
         "temperature 0.3": {"temperature": 0.3}, "top_p 0.9": {"temperature": 1.0, "top_p": 0.9},
         "server defaults": DEFAULTS}


def best_microseconds(run: Callable[[], None], rounds: int, repeats: int) -> float:
    """Best of ``repeats`` timings of ``rounds`` calls of ``run``, per call, after a warm-up round."""
    def per_call() -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            run()
        return (time.perf_counter() - started) / rounds

    return best_of(repeats, per_call) * 1e6


def engine_aggregate(engine: Engine, params: SamplingParams) -> float:
    """Output tok/s of the eight questions at once, stepping the engine on this thread."""
    finished: list[Finished] = []

    def sink(event: EngineEvent) -> None:
        if isinstance(event, Finished):
            finished.append(event)

    started = time.perf_counter()
    for index, question in enumerate(QUESTIONS):
        messages = (ChatMessage("user", (TextChunk(question),)),)
        engine.add_request(GenerationRequest(f"q{index}-{time.monotonic_ns()}", messages, params), sink)
    while engine.step():
        pass
    return sum(f.num_output_tokens for f in finished) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config({"data_dir": str(default_data_dir()), "model": DEFAULT_DECODER, "quantize": args.quantize},
                         env={})
    model = load_model(config, progress=lambda _: None)
    rows = []
    for question in QUESTIONS:
        logits, _ = model.prefill(model.render((ChatMessage("user", (TextChunk(question),)),), 4096), None)
        rows.append(logits.float())
    logits = torch.stack(rows)  # (8, vocab)
    output, prompt = list(range(1000, 1100)), list(range(500, 560))  # a 100-token answer so far, for the penalty
    print(f"sample() per row, {args.quantize}'s logits for {len(rows)} questions (vocabulary {logits.shape[-1]}):")
    for label, settings in CASES.items():
        params, generator = SamplingParams(**settings), make_generator(0)

        def each_row(params: SamplingParams = params, generator: torch.Generator = generator) -> None:
            for row in logits:
                sample(row, params, generator, prompt_token_ids=prompt, output_token_ids=output,
                       exempt_token_ids=model.eos_token_ids)

        print(f"  {label:32s} {best_microseconds(each_row, 300, args.repeats) / len(rows):7.1f} us")
    one = best_microseconds(lambda: logits.argmax(dim=-1).tolist(), 300, args.repeats)
    eight = best_microseconds(lambda: [int(torch.argmax(row)) for row in logits], 300, args.repeats)
    print(f"greedy picks for {len(rows)} rows: one argmax {one:.1f} us, one per row {eight:.1f} us")
    engine = Engine(model, max_num_running=len(QUESTIONS), kv_cache_bytes=0)
    engine_aggregate(engine, SamplingParams(temperature=0.0, max_output_tokens=8))  # warm-up
    for label, settings in (("greedy", {"temperature": 0.0}), ("server defaults", DEFAULTS)):
        params = SamplingParams(**settings, seed=1, max_output_tokens=args.tokens)
        best = max(engine_aggregate(engine, params) for _ in range(args.repeats))
        print(f"engine, {len(QUESTIONS)} conversations at once, {label}: {best:.1f} tok/s aggregate (best of "
              f"{args.repeats})")


if __name__ == "__main__":
    main()
