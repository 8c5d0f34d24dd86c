"""Prefill and decode tokens/s of the default model, batch of 1, on this machine. Prints; never asserts.

    python -m bench.decode [--model SPEC] [--dtype bfloat16] [--quantize none|nf4|int8|int8-cpu|int4-cpu]
                           [--new-tokens 64] [--repeats 3]

Three figures, each the best of ``--repeats`` runs after one warm-up (the first
forward pass pays one-off kernel set-up):

- prefill tok/s on the ~40-token chat prompt of PERF-NOTES.md and on a ~500-token one;
- decode tok/s of the bare model loop (``ChatModel.decode`` + argmax);
- decode tok/s through the whole engine (scheduling, sampling, detokenizing, events).

Machines are shared and noisy: compare ratios within one run, not absolutes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from assistant.engine.engine import Engine
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel, Prompt
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk
from assistant.engine.sampling import SamplingParams
from assistant.models import DEFAULT_DECODER, default_data_dir, resolve_model

SHORT = "What is the capital of France? Answer in one sentence, then name two famous landmarks there."
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 36) + " Summarize this."


def best_of(repeats: int, run: Callable[[], float]) -> float:
    run()  # warm-up
    return min(run() for _ in range(repeats))


def prompt_of(model: ChatModel, text: str) -> Prompt:
    return model.render((ChatMessage("user", (TextChunk(text),)),), model.max_context_tokens)


def time_prefill(model: ChatModel, prompt: Prompt) -> float:
    started = time.perf_counter()
    model.prefill(prompt)
    return time.perf_counter() - started


def time_model_decode(model: ChatModel, prompt: Prompt, num_tokens: int) -> float:
    logits, cache = model.prefill(prompt)  # (vocab,)
    token = int(logits.argmax())
    started = time.perf_counter()
    for _ in range(num_tokens):
        token = int(model.decode(token, cache, has_images=bool(prompt.images)).argmax())
    return time.perf_counter() - started


def time_engine_decode(model: ChatModel, text: str, num_tokens: int, *,
                       system: str | None = None) -> tuple[float, int]:
    """Seconds from the first token to the last, and how many tokens came in between (greedy, ``text`` as the
    user's message after the ``system`` prompt, if any)."""
    engine = Engine(model)
    events: list[EngineEvent] = []
    first_token_at: list[float] = []

    def sink(event: EngineEvent) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        events.append(event)

    messages = [ChatMessage("system", (TextChunk(system),))] if system else []
    messages.append(ChatMessage("user", (TextChunk(text),)))
    params = SamplingParams(temperature=0.0, max_output_tokens=num_tokens + 1)
    engine.add_request(GenerationRequest("bench", tuple(messages), params), sink)
    while engine.step():
        pass
    finished = events[-1]
    assert isinstance(finished, Finished)
    return time.perf_counter() - first_token_at[0], finished.num_output_tokens - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "int8", "int8-cpu", "int4-cpu"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model(args.model, default_data_dir())
    started = time.perf_counter()
    model = load_chat_model(source, dtype=args.dtype, quantize=args.quantize)
    print(f"model   {source} ({args.dtype}, quantize {args.quantize}), "
          f"loaded in {time.perf_counter() - started:.1f} s, torch threads {torch.get_num_threads()}")
    short, long = prompt_of(model, SHORT), prompt_of(model, LONG)
    for name, prompt in (("short", short), ("long", long)):
        seconds = best_of(args.repeats, lambda: time_prefill(model, prompt))
        print(f"prefill {name:>5} prompt  {prompt.num_tokens:4d} tokens  {prompt.num_tokens / seconds:8.1f} tok/s")
    seconds = best_of(args.repeats, lambda: time_model_decode(model, short, args.new_tokens))
    print(f"decode  model loop   {args.new_tokens:4d} tokens  {args.new_tokens / seconds:8.1f} tok/s  (batch 1)")
    runs = [time_engine_decode(model, SHORT, args.new_tokens) for _ in range(args.repeats + 1)][1:]
    seconds, num_tokens = min(runs)
    print(f"decode  engine       {num_tokens:4d} tokens  {num_tokens / seconds:8.1f} tok/s  (batch 1, may stop early at eos)")


if __name__ == "__main__":
    main()
