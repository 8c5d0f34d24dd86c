"""The quantized-decode candidates side by side on this machine: single-stream and batch-8 decode through the
engine, and whether each keeps greedy output batch-invariant. Prints; never asserts.

    python -m bench.quantize [--tokens 32] [--candidates nf4:bfloat16,int8-cpu:bfloat16,...]

Candidates (``KIND:DTYPE``): bitsandbytes ``nf4`` (bf16 compute, and float32 compute)
and ``int8``; ``int8-cpu`` (weight-only int8 on PyTorch's CPU kernel, bf16 and float32
activations); ``int4-cpu`` (4-bit groups of 32 on PyTorch's CPU kernel, output head
included; bf16 products); unquantized ``none`` (bf16) for reference. Every kind but
bitsandbytes' decodes through the lean step of :mod:`assistant.engine.fast_decode`. Each loads the default decoder
(SmolLM2-135M-Instruct) and runs, greedy, through :class:`~assistant.engine.engine.Engine`:

- single: one request, tokens/s from its first token to its last;
- batch 8: eight different prompts queued at once, aggregate tokens/s over the whole run;
- batch-invariant: whether two of those eight, decoded alone, give the same text as in the batch;
- agrees: how many leading output tokens of the first prompt match the unquantized float32 decoder's.

The CPU's features decide which bitsandbytes path runs (its packed nf4 kernel needs
AVX512-BF16): the header line says which this machine has. Machines are shared and
noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from assistant.engine.engine import Engine
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from assistant.engine.quantize import cpu_packs_nf4
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk, TokenDelta
from assistant.engine.sampling import SamplingParams
from assistant.models import DEFAULT_DECODER, default_data_dir, resolve_model

DEFAULT_CANDIDATES = ("none:bfloat16", "nf4:bfloat16", "nf4:float32", "int8:bfloat16", "int8-cpu:bfloat16",
                      "int8-cpu:float32", "int4-cpu:bfloat16")
PROMPTS = ("Write a long story about a lighthouse keeper.", "Explain how a bicycle works, step by step.",
           "List ten facts about the Moon.", "Describe a busy market in the morning.",
           "What makes a good teacher? Answer at length.", "Tell me about the history of bread.",
           "How do airplanes fly? Explain in detail.", "Write a letter to a friend about a trip to the sea.")


def run(model: ChatModel, prompts: tuple[str, ...], tokens: int) -> tuple[float, dict[str, tuple[str, int]], float]:
    """Queue every prompt at once; (seconds from the first step to the end, each request's text and output
    token count, seconds from the first request's first token to its last)."""
    engine = Engine(model, max_num_running=len(prompts))
    events: dict[str, list[EngineEvent]] = {}
    for index, prompt in enumerate(prompts):
        request_id = f"r{index}"
        events[request_id] = []
        params = SamplingParams(temperature=0.0, max_output_tokens=tokens)
        engine.add_request(GenerationRequest(request_id, (ChatMessage("user", (TextChunk(prompt),)),), params),
                           events[request_id].append)
    first_token_at: float | None = None
    started = time.perf_counter()
    while engine.step():
        if first_token_at is None and any(isinstance(e, TokenDelta) for e in events["r0"]):
            first_token_at = time.perf_counter()
    ended = time.perf_counter()
    results = {}
    for request_id, evs in events.items():
        finished = evs[-1]
        assert isinstance(finished, Finished), finished
        results[request_id] = ("".join(e.text for e in evs if isinstance(e, TokenDelta)), finished.num_output_tokens)
    return ended - started, results, ended - (first_token_at or started)


def agreeing_tokens(model: ChatModel, text: str, reference: str) -> int:
    ours = model.tokenizer(text, add_special_tokens=False).input_ids
    theirs = model.tokenizer(reference, add_special_tokens=False).input_ids
    count = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES))
    args = parser.parse_args()

    source = resolve_model(DEFAULT_DECODER, default_data_dir())
    print(f"CPU AVX512-BF16 (bitsandbytes' packed nf4 kernel): {'yes' if cpu_packs_nf4() else 'no'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} tokens a request, greedy")
    reference_model = load_chat_model(source, dtype="float32")
    reference_text, reference_tokens = run(reference_model, PROMPTS[:1], args.tokens)[1]["r0"]
    del reference_model
    print(f"{'candidate':<20} {'single tok/s':>12} {'batch-8 tok/s':>14} {'batch-invariant':>16} "
          f"{'agrees with fp32':>17}")
    for candidate in args.candidates.split(","):
        kind, dtype = candidate.split(":")
        try:
            model = load_chat_model(source, dtype=dtype, quantize=kind)
        except Exception as exc:  # e.g. bitsandbytes refusing this CPU
            print(f"{candidate:<20} failed to load: {exc}")
            continue
        run(model, PROMPTS[:1], 4)  # warm-up
        _, single, single_seconds = run(model, PROMPTS[:1], args.tokens)
        seconds, batched, _ = run(model, PROMPTS, args.tokens)
        total = sum(count for _, count in batched.values())
        alone = [run(model, (PROMPTS[i],), args.tokens)[1]["r0"] for i in (1, 5)]
        invariant = alone == [batched["r1"], batched["r5"]]
        agrees = agreeing_tokens(model, single["r0"][0], reference_text)
        print(f"{candidate:<20} {(single['r0'][1] - 1) / single_seconds:12.1f} {total / seconds:14.1f} "
              f"{'yes' if invariant else 'no':>16} {agrees:>12} / {reference_tokens}")
        del model


if __name__ == "__main__":
    main()
