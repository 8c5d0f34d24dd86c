"""Constrained decoding libraries side by side, with the default model's tokenizer. Prints; never asserts.

    python -m bench.grammar [--model SPEC] [--dtype bfloat16] [--repeats 5] [--no-model] [--torch-threads N]

The grammar is the one a Chat Completions request with ``tool_choice: "auto"``
needs: free text, OR one tool call ``<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`` to one of three tools (weather with an enum unit, order
lookup with a pattern id, handoff to a human with a reason). Each candidate
expresses it its own way: llguidance as Lark with ``%json{...}``, xgrammar as a
structural tag (free text until ``<tool_call>``, then the tool's schema),
outlines-core as one regex (free text | the calls, each schema as a regex).

Figures per candidate, each the best of ``--repeats`` runs:

- ``tokenizer``: one-off set-up per tokenizer (kept for the server's life);
- ``compile``: building the matcher for the grammar from cold (no cache);
- ``mask+advance``: per token, the library's own work: computing the allowed-token
  bitmask and advancing by the token, along a tool call and along free text.

Then the engine's whole per-token cost with the chosen library
(:class:`~assistant.engine.constraint.Constraint`: mask, apply it to a logits
row, advance), and one decode step of the real model (batch 1,
``ChatModel.decode``) for scale, unless ``--no-model``. Without a pulled default model the byte-level tokenizer of
the test fixtures stands in (vocab 320: far cheaper masks than the real 49,152).
xgrammar and outlines-core are not the project's dependencies: ``pip install xgrammar
outlines-core`` to compare (a candidate that is missing prints its import error).
Machines are shared and noisy: compare ratios within one run, not absolutes. On a
CPU busy with other work torch's intra-op threads wait on each other, and every
torch op on a row of logits (the mask's application, sampling) slows down many
times; ``--torch-threads 1`` shows the cost without that.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel, Prompt
from assistant.engine.request import ChatMessage, TextChunk
from assistant.models import DEFAULT_DECODER, default_data_dir, is_complete, resolve_model
from bench.decode import best_of

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    "lookup_order": {"type": "object", "additionalProperties": False, "required": ["order_id"], "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}}},
    "handoff_to_human": {"type": "object", "additionalProperties": False, "required": ["reason"], "properties": {
        "reason": {"type": "string"}}},
}
CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France", "unit": "celsius"}}\n'
        '</tool_call>')
TEXT = ("I can help with that. The weather in Paris today is mild, around eighteen degrees, with light wind "
        "from the west and a chance of rain in the evening.")
OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"


def call_prefix(name: str) -> str:
    return f'{OPEN}{{"name": "{name}", "arguments": '


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


# ------------------------------------------------------------------ candidates
# Each returns (tokenizer set-up s, compile s, {path: s per token}).


def bench_llguidance(tokenizer: Any, paths: dict[str, list[int]], repeats: int) -> tuple[float, float, dict]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    setup, ll_tokenizer = timed(lambda: llguidance.hf.from_tokenizer(tokenizer))
    separators = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    calls = " | ".join(f"call_{i}" for i in range(len(TOOLS)))
    rules = [f"start: TEXT | {json.dumps(OPEN)} ({calls}) {json.dumps(CLOSE)}", r"TEXT: /[^<](.|\n)*/"]
    for i, (name, schema) in enumerate(TOOLS.items()):
        rules.append(f'call_{i}: {json.dumps(call_prefix(name)[len(OPEN):])} '
                     f'%json{json.dumps({**schema, "x-guidance": separators})} "}}"')
    grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(rules))

    def compile_once() -> float:
        seconds, matcher = timed(lambda: llguidance.LLMatcher(ll_tokenizer, grammar))
        assert not matcher.is_error(), matcher.get_error()
        return seconds

    def walk(token_ids: list[int]) -> float:
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)  # (1, ceil(vocab / 32))
        started = time.perf_counter()
        for token_id in token_ids:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
            matcher.consume_token(token_id)
        assert not matcher.is_error(), matcher.get_error()
        return (time.perf_counter() - started) / len(token_ids)

    return setup, best_of(repeats, compile_once), {path: best_of(repeats, lambda: walk(ids))
                                                    for path, ids in paths.items()}


def bench_xgrammar(tokenizer: Any, paths: dict[str, list[int]], repeats: int) -> tuple[float, float, dict]:
    import xgrammar

    setup, info = timed(lambda: xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    tags = [{"type": "tag", "begin": call_prefix(name),
             "content": {"type": "json_schema", "json_schema": schema}, "end": "}" + CLOSE}
            for name, schema in TOOLS.items()]
    structural_tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags, "stop_after_first": True}}

    def compile_once() -> float:
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        return timed(lambda: compiler.compile_structural_tag(structural_tag))[0]

    compiled = xgrammar.GrammarCompiler(info).compile_structural_tag(structural_tag)

    def walk(token_ids: list[int]) -> float:
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)  # (1, ceil(vocab / 32))
        started = time.perf_counter()
        for token_id in token_ids:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(token_id), token_id
        return (time.perf_counter() - started) / len(token_ids)

    return setup, best_of(repeats, compile_once), {path: best_of(repeats, lambda: walk(ids))
                                                    for path, ids in paths.items()}


def bench_outlines_core(tokenizer: Any, paths: dict[str, list[int]], repeats: int) -> tuple[float, float, dict]:
    import llguidance.hf  # only to read each token's bytes the same way
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary() -> outlines_core.Vocabulary:
        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        token_ids: dict[bytes, list[int]] = {}
        for token_id in range(len(tokenizer)):
            if token_id not in tokenizer.all_special_ids:
                token_ids.setdefault(ll_tokenizer.decode_bytes([token_id]), []).append(token_id)
        return outlines_core.Vocabulary(tokenizer.eos_token_id, token_ids)

    setup, vocab = timed(vocabulary)

    def literal(text: str) -> str:
        return "".join("\\n" if c == "\n" else f"\\{c}" if c in r".^$*+?{}[]()|\/" else c for c in text)

    calls = "|".join(f"({literal(call_prefix(name)[len(OPEN):])}"
                     f"{build_regex_from_schema(json.dumps(schema), ' ?')}\\}})" for name, schema in TOOLS.items())
    regex = f"([^<][\\s\\S]*)|({literal(OPEN)}({calls}){literal(CLOSE)})"

    def compile_once() -> float:
        return timed(lambda: outlines_core.Index(regex, vocab))[0]

    index = outlines_core.Index(regex, vocab)

    def walk(token_ids: list[int]) -> float:
        guide = outlines_core.Guide(index)
        mask = torch.zeros(1, (len(tokenizer) + 31) // 32, dtype=torch.int32)  # (1, ceil(vocab / 32))
        started = time.perf_counter()
        for token_id in token_ids:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            guide.advance(token_id, return_tokens=False)
        return (time.perf_counter() - started) / len(token_ids)

    return setup, best_of(min(repeats, 2), compile_once), {path: best_of(repeats, lambda: walk(ids))
                                                            for path, ids in paths.items()}


def time_engine_path(tokenizer: Any, token_ids: list[int], repeats: int) -> tuple[float, float]:
    """The engine's own cost per token (mask, apply to a logits row, advance), and a cached compile's."""
    from assistant.engine.constraint import GrammarCompiler
    from assistant.tools import FunctionTool, ToolChoice, build_grammar

    grammar = build_grammar([FunctionTool(name, "", schema) for name, schema in TOOLS.items()], ToolChoice("auto"),
                            parallel_tool_calls=False)
    assert grammar is not None
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id})
    compiler.compile(grammar)  # the tokenizer's trie and the grammar, once

    def walk() -> float:
        constraint = compiler.compile(grammar)
        logits = torch.randn(len(tokenizer))  # (vocab,)
        started = time.perf_counter()
        for token_id in token_ids:
            constraint.mask_logits(logits)
            constraint.advance(token_id)
        return (time.perf_counter() - started) / len(token_ids)

    return best_of(repeats, walk), best_of(repeats, lambda: timed(lambda: compiler.compile(grammar))[0])


CANDIDATES = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines_core}


def time_decode_step(model: ChatModel, num_tokens: int = 32) -> float:
    prompt: Prompt = model.render((ChatMessage("user", (TextChunk("What is the weather in Paris?"),)),),
                                  model.max_context_tokens)
    logits, cache = model.prefill(prompt)  # (vocab,)
    token = int(logits.argmax())
    started = time.perf_counter()
    for _ in range(num_tokens):
        token = int(model.decode(token, cache, has_images=False).argmax())
    return (time.perf_counter() - started) / num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-model", action="store_true", help="skip the decode step of the real model")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: as the process has it)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model: ChatModel | None = None
    pulled = default_data_dir() / "models" / DEFAULT_DECODER
    if args.model != DEFAULT_DECODER or is_complete(pulled):
        source = resolve_model(args.model, default_data_dir())
        model = load_chat_model(source, dtype=args.dtype)
        tokenizer = model.tokenizer
        print(f"tokenizer  {source}  vocab {len(tokenizer)}, torch threads {torch.get_num_threads()}")
    else:
        from tests.engine_fixtures import byte_level_tokenizer

        tokenizer = byte_level_tokenizer()
        print(f"tokenizer  the test fixtures' byte-level BPE (no pulled default model)  vocab {len(tokenizer)}")
    paths = {"call": tokenizer.encode(CALL, add_special_tokens=False),
             "text": tokenizer.encode(TEXT, add_special_tokens=False)}
    print(f"grammar    free text | one call to {len(TOOLS)} tools; walks: call {len(paths['call'])} tokens, "
          f"text {len(paths['text'])} tokens")
    print(f"{'library':<14} {'tokenizer ms':>12} {'compile ms':>11} {'mask+advance ms/tok':>20}")
    print(f"{'':<14} {'':>12} {'':>11} {'call':>9} {'text':>10}")
    for name, run in CANDIDATES.items():
        try:
            setup, compile_s, per_token = run(tokenizer, paths, args.repeats)
        except Exception as exc:  # a candidate that cannot express the grammar is a result too
            print(f"{name:<14} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        print(f"{name:<14} {setup * 1e3:12.1f} {compile_s * 1e3:11.2f} {per_token['call'] * 1e3:9.3f} "
              f"{per_token['text'] * 1e3:10.3f}")
    per_token, cached = time_engine_path(tokenizer, paths["call"], args.repeats)
    print(f"engine (llguidance): mask + apply to logits + advance {per_token * 1e3:.3f} ms/token along the call; "
          f"a cached grammar {cached * 1e3:.3f} ms")
    if model is not None and not args.no_model:
        step = best_of(args.repeats, lambda: time_decode_step(model))
        print(f"decode step of the model ({args.dtype}, batch 1): {step * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
