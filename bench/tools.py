"""Tool use over both APIs with the default model: valid arguments, the right tool, the grammar's cost.
Prints; never asserts.

    OMP_NUM_THREADS=1 python -m bench.tools [--model SPEC] [--quantize auto|nf4|none|int8|int8-cpu] [--count 20]
                                            [--max-tokens 60] [--overhead-count 8] [--repeats 3]

A fixed set of prompts, each with the tool it should call or none: weather questions
(``get_weather``), order look-ups with an order id (``lookup_order``, whose id has a
pattern), requests for a person (``handoff_to_human``) and questions that need no tool.
The server is started in-process as ``assistant serve`` builds it (a throw-away SQLite
store, a free port); every prompt goes alone (after the server's system prompt), greedy
(``temperature`` 0; the server's other sampling defaults, its frequency penalty
included, still apply), capped at ``--max-tokens``:

- ``chat auto``: Chat Completions through the ``openai`` SDK, ``tool_choice: "auto"``;
- ``realtime auto``: the Realtime socket (raw ``websockets``), ``response.create`` with
  ``conversation: "none"``, the tools and ``tool_choice: "auto"``;
- ``chat required``: Chat Completions with ``tool_choice: "required"`` and
  ``parallel_tool_calls: false``: every answer is one call, so every prompt tests argument
  validity (no-tool prompts cannot be right here). With parallel calls allowed the
  greedy model tends to write call after call until the cap cuts one.

Per run: prompts that called a tool, calls, ``valid`` (share of calls whose arguments
parse as JSON and validate against the tool's schema with ``jsonschema``; the grammar
should make it 100 %, less only for a call cut by the token cap), ``right`` (share of
prompts that called exactly the expected tool, or rightly none), and the same split
over tool prompts and no-tool prompts; then how often the two APIs answered alike
(same tools, grammar and sampling, greedy: where they differ, so do the prompts' tokens),
every prompt's answers, and the invalid calls, if any.

Then the grammar's cost, in-process on :class:`~assistant.engine.engine.Engine` (no
sockets): the first ``--overhead-count`` prompts with the tools prompt, generated with
no grammar (free), the ``auto`` grammar and the one-call ``required`` grammar, the three
in turn, ``--repeats`` times; per prompt and grammar the fastest run's decode time per
output token after the first delta (the prefill and the grammar's compile excluded),
summed over the prompts, and the overhead against free. Where ``auto`` answers in text
its tokens are mostly the free answer's; a ``required`` call is other tokens, so that
figure is time per token, not per answer. Last, llguidance's own work per token
(mask, apply to a logits row, advance) along a call and along text, as
``bench.grammar`` measures it: the overhead the engine figures should show, without
the noise of a shared machine.

Machines are shared and noisy: compare ratios within one run, not absolutes. On a
shared CPU ``OMP_NUM_THREADS=1`` keeps torch's threads from waiting on each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect

from bench.serving import run_response, serving

PARAMETERS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    "lookup_order": {"type": "object", "additionalProperties": False, "required": ["order_id"], "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z][0-9]{5}$",
                     "description": "One capital letter and five digits, e.g. A12345"}}},
    "handoff_to_human": {"type": "object", "additionalProperties": False, "required": ["reason"], "properties": {
        "reason": {"type": "string", "description": "Why the customer needs a person"}}},
}
DESCRIPTIONS = {
    "get_weather": "Get the current weather in a city.",
    "lookup_order": "Look up the status and delivery of a customer's order by its id.",
    "handoff_to_human": "Hand the conversation over to a human support agent.",
}
REALTIME_TOOLS = [{"type": "function", "name": name, "description": DESCRIPTIONS[name], "parameters": schema}
                  for name, schema in PARAMETERS.items()]
CHAT_TOOLS = [{"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}
              for tool in REALTIME_TOOLS]
VALIDATORS = {name: jsonschema.Draft202012Validator(schema) for name, schema in PARAMETERS.items()}

# The expected tool (None: no tool) → its prompts.
PROMPTS: dict[str | None, list[str]] = {
    "get_weather": ["What's the weather in Paris?", "Is it raining in Tokyo right now?",
                    "How hot is it in Cairo today, in fahrenheit?", "Do I need an umbrella in London this afternoon?",
                    "What's the temperature in Berlin in celsius?"],
    "lookup_order": ["Where is my order A12345?", "Can you check the status of order B67890?",
                     "My package Z00042 hasn't arrived yet. What's going on?", "Has order C13579 shipped?",
                     "Track order D24680 for me."],
    "handoff_to_human": ["I want to talk to a person.", "This is useless, get me a human agent.",
                         "Please transfer me to someone on your support staff.",
                         "Can I speak with a real human about a refund?"],
    None: ["What is the capital of Japan?", "Tell me a joke.", "How many legs does a spider have?",
           "Translate 'good morning' into French.", "What is 12 times 7?", "Who wrote Romeo and Juliet?"],
}


@dataclass(frozen=True)
class Case:
    text: str
    expected: str | None  # the tool to call, or None


def cases(count: int) -> list[Case]:
    """The first ``count`` prompts, taking one of each kind in turn, so a short run still has every kind."""
    rounds = zip_longest(*([Case(text, tool) for text in texts] for tool, texts in PROMPTS.items()))
    return [case for row in rounds for case in row if case is not None][:count]


# ------------------------------------------------------------ answers


@dataclass(frozen=True)
class Answer:
    case: Case
    calls: tuple[tuple[str, str], ...]  # (name, arguments JSON) per call, in order
    text: str
    num_output_tokens: int
    is_capped: bool  # stopped by the token cap
    seconds: float

    def problems(self) -> list[str]:
        """Per call, "" when its arguments parse and validate against its tool's schema, else what is wrong."""
        return [argument_problem(name, arguments) for name, arguments in self.calls]

    @property
    def is_right(self) -> bool:
        if self.case.expected is None:
            return not self.calls
        return bool(self.calls) and {name for name, _ in self.calls} == {self.case.expected}

    @property
    def shown(self) -> str:
        """What the model answered, in one line: the calls, else the text."""
        if self.calls:
            return "  ".join(f"{name}({arguments})" for name, arguments in self.calls)
        return "text: " + json.dumps(" ".join(self.text.split())[:100])


def argument_problem(name: str, arguments: str) -> str:
    if name not in VALIDATORS:
        return f"no tool named {name!r}"
    try:
        value = json.loads(arguments)
    except ValueError as error:
        return f"not JSON ({error})"
    error = best_match(VALIDATORS[name].iter_errors(value))
    return "" if error is None else f"schema: {error.message}"


async def ask_chat(client: AsyncOpenAI, case: Case, tool_choice: str, max_tokens: int) -> Answer:
    """With ``required``, one call (``parallel_tool_calls: false``): greedy, the model would go on calling."""
    started = time.perf_counter()
    completion = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": case.text}], tools=CHAT_TOOLS,  # type: ignore[arg-type]
        tool_choice=tool_choice, parallel_tool_calls=tool_choice != "required",  # type: ignore[arg-type]
        temperature=0, max_tokens=max_tokens)
    seconds = time.perf_counter() - started
    choice = completion.choices[0]
    calls = tuple((call.function.name, call.function.arguments) for call in choice.message.tool_calls or ())
    tokens = completion.usage.completion_tokens if completion.usage else 0
    return Answer(case, calls, choice.message.content or "", tokens, choice.finish_reason == "length", seconds)


async def ask_realtime(ws: ClientConnection, case: Case, tool_choice: str, max_tokens: int) -> Answer:
    message = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": case.text}]}
    done, seconds = await run_response(ws, {
        "conversation": "none", "input": [message], "output_modalities": ["text"], "tools": REALTIME_TOOLS,
        "tool_choice": tool_choice, "temperature": 0, "max_output_tokens": max_tokens})
    calls = tuple((item["name"], item["arguments"]) for item in done["output"] if item["type"] == "function_call")
    text = "".join(part.get("text", "") for item in done["output"] if item["type"] == "message"
                   for part in item["content"])
    return Answer(case, calls, text, done["usage"]["output_tokens"], done["status"] == "incomplete", seconds)


async def ask_all(model: str, quantize: str, resolved: str, prompts: list[Case],
                  max_tokens: int) -> dict[str, list[Answer]]:
    """Every prompt through each run in turn, one at a time, printing each run's row as it ends."""
    runs: dict[str, list[Answer]] = {}
    label = f"model   {model} (quantize {quantize}{f': {resolved}' if resolved != quantize else ''})"
    async with serving(label, model=model, quantize=quantize) as url:
        print(f"{'run':<14} {HEADER}", flush=True)
        async with AsyncOpenAI(api_key="sk-unused", base_url=url.replace("ws", "http", 1).removesuffix("/realtime"),
                               max_retries=0, timeout=600) as client:
            runs["chat auto"] = [await ask_chat(client, case, "auto", max_tokens) for case in prompts]
            print(row("chat auto", runs["chat auto"]), flush=True)
            async with connect(url, max_size=None) as ws:
                await ws.recv()  # session.created
                runs["realtime auto"] = [await ask_realtime(ws, case, "auto", max_tokens) for case in prompts]
            print(row("realtime auto", runs["realtime auto"]), flush=True)
            runs["chat required"] = [await ask_chat(client, case, "required", max_tokens) for case in prompts]
            print(row("chat required", runs["chat required"]), flush=True)
    return runs


# ------------------------------------------------------------ report

HEADER = "prompts  called  calls  valid  capped   right  right tool  rightly none  tokens(med)  s/prompt(med)"


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.0f}%" if whole else "     -"


def row(label: str, answers: list[Answer]) -> str:
    problems = [problem for answer in answers for problem in answer.problems()]
    tool_prompts = [a for a in answers if a.case.expected is not None]
    plain_prompts = [a for a in answers if a.case.expected is None]
    return (f"{label:<14} {len(answers):7d} {sum(bool(a.calls) for a in answers):7d} {len(problems):6d} "
            f"{percent(problems.count(''), len(problems))} {sum(a.is_capped for a in answers):7d} "
            f"{percent(sum(a.is_right for a in answers), len(answers))} "
            f"{percent(sum(a.is_right for a in tool_prompts), len(tool_prompts)):>11} "
            f"{percent(sum(a.is_right for a in plain_prompts), len(plain_prompts)):>13} "
            f"{statistics.median(a.num_output_tokens for a in answers):12.0f} "
            f"{statistics.median(a.seconds for a in answers):14.2f}")


def print_answers(runs: dict[str, list[Answer]]) -> None:
    chat, realtime = runs["chat auto"], runs["realtime auto"]
    unlike = [(a, b) for a, b in zip(chat, realtime) if (a.calls, a.text) != (b.calls, b.text)]
    print(f"\nchat auto and realtime auto answered alike on {len(chat) - len(unlike)} of {len(chat)} prompts")
    for a, b in unlike[:3]:
        print(f"  {a.case.text!r}\n      chat:     {a.shown[:150]}\n      realtime: {b.shown[:150]}")
    print("\nper prompt: expected tool -> what 'auto' answered (chat); what 'required' called")
    for auto, required in zip(chat, runs["chat required"]):
        mark = "ok " if auto.is_right else "NO "
        print(f"{mark}{auto.case.expected or '(none)':<17} {auto.case.text!r}\n"
              f"      auto:     {auto.shown[:150]}\n      required: {required.shown[:150]}")
    bad = [(answer, name, arguments, problem) for answers in runs.values() for answer in answers
           for (name, arguments), problem in zip(answer.calls, answer.problems()) if problem]
    for answer, name, arguments, problem in bad[:6]:
        print(f"invalid call to {name} for {answer.case.text!r}: {problem} (capped: {answer.is_capped}): "
              f"{arguments[:120]}")


# ------------------------------------------------------------ the grammar's cost


def grammar_overhead(model_spec: str, quantize: str, prompts: list[Case], max_tokens: int, repeats: int) -> None:
    import torch

    from assistant.config import load_config
    from assistant.engine.constraint import GrammarCompiler
    from assistant.engine.engine import Engine
    from assistant.engine.loader import load_model
    from assistant.engine.request import ChatMessage, Finished, GenerationRequest, TextChunk, TokenDelta
    from assistant.engine.sampling import SamplingParams
    from assistant.prompts import load_system_prompt
    from assistant.tool_calls import render_tool_calls
    from assistant.tools import ToolChoice, build_grammar, parse_tools, tools_prompt

    model = load_model(load_config({"model": model_spec, "quantize": quantize}, env={}), progress=lambda _: None)
    tools = parse_tools(CHAT_TOOLS)
    system = load_system_prompt() + "\n\n" + tools_prompt(tools, ToolChoice("auto"))  # as both APIs write it
    grammars = {"free": None, "auto": build_grammar(tools, ToolChoice("auto")),
                "required": build_grammar(tools, ToolChoice("required"), parallel_tool_calls=False)}
    engine = Engine(model, kv_cache_bytes=256 << 20)  # the shared system prompt is prefilled once; decode is timed

    def decode(text: str, grammar: str | None) -> tuple[float, int]:
        """Seconds per output token after the first delta, and how many tokens came after it."""
        events: list[Any] = []
        first_delta_at: list[float] = []

        def sink(event: Any) -> None:
            if isinstance(event, TokenDelta) and not first_delta_at:
                first_delta_at.append(time.perf_counter())
            events.append(event)

        messages = (ChatMessage("system", (TextChunk(system),)), ChatMessage("user", (TextChunk(text),)))
        engine.add_request(GenerationRequest(f"r{time.monotonic_ns()}", messages,
                                             SamplingParams(temperature=0.0, max_output_tokens=max_tokens),
                                             grammar=grammar), sink)
        while engine.step():
            pass
        finished, first = events[-1], events[0]
        assert isinstance(finished, Finished) and finished.reason in ("stop", "length"), finished
        if not first_delta_at:  # an empty answer: nothing decoded to time
            return 0.0, 0
        seconds = time.perf_counter() - first_delta_at[0]
        tokens = finished.num_output_tokens - first.num_tokens
        return seconds / max(tokens, 1), tokens

    decode(prompts[0].text, grammars["required"])  # warm-up: kernels, the tokenizer's trie, the system prompt's KV
    best: dict[tuple[int, str], tuple[float, int]] = {}
    for _ in range(repeats):  # the grammars in turn, so a busy spell of the machine hits all three
        for i, case in enumerate(prompts):
            for mode, grammar in grammars.items():
                run = decode(case.text, grammar)
                best[i, mode] = min(best.get((i, mode), run), run)
    totals = {mode: [0.0, 0] for mode in grammars}
    for (_, mode), (per_token, tokens) in best.items():
        totals[mode][0] += per_token * tokens
        totals[mode][1] += tokens
    free_seconds, free_tokens = totals["free"]
    free = free_seconds / max(free_tokens, 1)
    print(f"\ngrammar cost: engine decode after the first token, {len(prompts)} prompts, best of {repeats}, "
          f"torch threads {torch.get_num_threads()}")
    for mode, (seconds, tokens) in totals.items():
        per_token = seconds / max(tokens, 1)
        overhead = "" if mode == "free" else f"   overhead {100 * (per_token / free - 1):+6.1f}% per token"
        print(f"  {mode:<9} {tokens:5d} tokens  {per_token * 1e3:7.2f} ms/token  {1 / per_token:6.1f} tok/s{overhead}")

    compiler = GrammarCompiler(model.tokenizer, model.eos_token_ids)
    call = render_tool_calls([("get_weather", '{"city": "Paris", "unit": "celsius"}')])
    text = "The capital of Japan is Tokyo, a city of about fourteen million people on the island of Honshu."
    for path, answer in (("call", call), ("text", text)):
        token_ids = model.tokenizer.encode(answer, add_special_tokens=False)

        def walk() -> float:
            constraint = compiler.compile(grammars["auto"])
            logits = torch.randn(len(model.tokenizer))  # (vocab,)
            started = time.perf_counter()
            for token_id in token_ids:
                constraint.mask_logits(logits)
                constraint.advance(token_id)
            return (time.perf_counter() - started) / len(token_ids)

        walk()  # warm-up
        per_token = min(walk() for _ in range(5))
        print(f"  llguidance mask + apply + advance along a {path}: {per_token * 1e3:.3f} ms/token "
              f"({100 * per_token / free:.1f}% of a free decode step)")


def main() -> None:
    from assistant.config import QUANTIZE_CHOICES, load_config
    from assistant.engine.loader import pick_device, pick_quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model of the in-process server (default: the server's)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="the server's --quantize (default: the server's)")
    parser.add_argument("--count", type=int, default=sum(map(len, PROMPTS.values())), help="prompts to run")
    parser.add_argument("--max-tokens", type=int, default=60, help="output cap per answer")
    parser.add_argument("--overhead-count", type=int, default=8, help="prompts timed with and without a grammar")
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and grammar; the best counts")
    args = parser.parse_args()
    defaults = load_config({}, env={})
    model, quantize = args.model or defaults.model, args.quantize or defaults.quantize
    resolved = pick_quantize(quantize, pick_device(defaults.device))
    prompts = cases(args.count)
    started = time.perf_counter()
    kinds = ", ".join(f"{sum(case.expected == tool for case in prompts)} {tool or 'no tool'}" for tool in PROMPTS)
    print(f"bench   {len(prompts)} prompts ({kinds}), greedy, max {args.max_tokens} tokens")
    runs = asyncio.run(ask_all(model, quantize, resolved, prompts, args.max_tokens))
    print_answers(runs)
    if args.overhead_count > 0:
        grammar_overhead(model, quantize, prompts[:args.overhead_count], args.max_tokens, args.repeats)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
