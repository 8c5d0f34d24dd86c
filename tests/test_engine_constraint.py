"""Constrained decoding: a random-weight model, which left alone writes garbage, writes only valid tool calls and
valid JSON under a grammar, batched or alone, greedy or sampled."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from assistant.engine.constraint import GrammarCompiler, UnsupportedGrammar
from assistant.engine.engine import Engine
from assistant.engine.model import ChatModel
from assistant.engine.request import EngineEvent, Finished, GenerationRequest, TokenDelta
from assistant.engine.sampling import SamplingParams
from assistant.tool_calls import parse_output
from assistant.tools import (FunctionTool, ResponseFormat, ToolChoice, build_grammar, parse_tool_choice,
                             parse_tools)
from tests.engine_fixtures import byte_level_tokenizer, user

# Bounded strings and numbers: a random model would otherwise fill the output budget inside one string.
TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"], "properties": {
            "city": {"type": "string", "maxLength": 8},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["order_id"], "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}}}}},
    {"type": "function", "function": {"name": "handoff_to_human", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["reason"], "properties": {
            "reason": {"type": "string", "maxLength": 10}}}}},
])
SCHEMAS = {tool.name: tool.parameters for tool in TOOLS}
MAX_TOKENS = 300  # the byte-level test tokenizer spends a token or two on each character
SAMPLED = [{"temperature": 1.0, "seed": seed} for seed in range(4)] + [
    {"temperature": 1.3, "top_p": 0.9, "seed": 7, "frequency_penalty": 1.5, "presence_penalty": 0.5,
     "repetition_penalty": 1.3}]


def request(request_id: str, grammar: str | None, **params: Any) -> GenerationRequest:
    params = {"temperature": 0.0, "max_output_tokens": MAX_TOKENS, **params}
    return GenerationRequest(request_id, (user("What is the weather in Paris?"),), SamplingParams(**params),
                             grammar=grammar)


def run(model: ChatModel, requests: list[GenerationRequest], *, max_num_running: int) -> dict[str, tuple]:
    """Each request's text and Finished, all admitted at once."""
    engine = Engine(model, max_num_running=max_num_running)
    events: dict[str, list[EngineEvent]] = {r.request_id: [] for r in requests}
    for req in requests:
        engine.add_request(req, events[req.request_id].append)
    while engine.step():
        pass
    return {rid: ("".join(e.text for e in evs if isinstance(e, TokenDelta)), evs[-1]) for rid, evs in events.items()}


def assert_valid_calls(text: str, finished: Finished, *, max_calls: int = 1, names: set[str] = set(SCHEMAS)) -> None:
    assert isinstance(finished, Finished) and finished.reason == "stop", (finished, text)
    calls = parse_output(text).calls
    assert 1 <= len(calls) <= max_calls and not parse_output(text).text, text
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("max_num_running", [1, 4], ids=["alone", "batched"])
def test_required_always_yields_a_valid_call_greedy_and_sampled(tiny_model: ChatModel, max_num_running: int) -> None:
    grammar = build_grammar(TOOLS, ToolChoice("required"), parallel_tool_calls=False)
    requests = [request("greedy", grammar)] + [request(f"s{i}", grammar, **p) for i, p in enumerate(SAMPLED)]
    for text, finished in run(tiny_model, requests, max_num_running=max_num_running).values():
        assert_valid_calls(text, finished)


def test_unconstrained_the_model_writes_no_call(tiny_model: ChatModel) -> None:
    text, finished = run(tiny_model, [request("free", None, max_output_tokens=40)], max_num_running=1)["free"]
    assert not parse_output(text).calls


def test_greedy_with_a_grammar_is_deterministic_and_batching_changes_nothing(tiny_model: ChatModel) -> None:
    grammar = build_grammar(TOOLS, ToolChoice("required"), parallel_tool_calls=False)
    requests = [request(f"r{i}", grammar) for i in range(3)]
    alone = run(tiny_model, requests, max_num_running=1)
    batched = run(tiny_model, requests, max_num_running=3)
    texts = {text for text, _ in [*alone.values(), *batched.values()]}
    assert len(texts) == 1


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_named_function_is_the_one_called(tiny_model: ChatModel, name: str) -> None:
    grammar = build_grammar(TOOLS, parse_tool_choice({"type": "function", "function": {"name": name}}, TOOLS))
    requests = [request("greedy", grammar)] + [request(f"s{i}", grammar, **p) for i, p in enumerate(SAMPLED)]
    for text, finished in run(tiny_model, requests, max_num_running=3).values():
        assert_valid_calls(text, finished, names={name})


def test_parallel_calls_are_each_valid(tiny_model: ChatModel) -> None:
    grammar = build_grammar(TOOLS[1:], ToolChoice("required"), parallel_tool_calls=True)
    outputs = run(tiny_model, [request(f"s{i}", grammar, **p, max_output_tokens=1000) for i, p in
                               enumerate(SAMPLED[:3])], max_num_running=3)
    for text, finished in outputs.values():
        assert_valid_calls(text, finished, max_calls=100)


def test_auto_lets_the_model_answer_in_text(tiny_model: ChatModel) -> None:
    grammar = build_grammar(TOOLS, ToolChoice("auto"))
    outputs = run(tiny_model, [request(f"s{i}", grammar, **p, max_output_tokens=30) for i, p in
                               enumerate(SAMPLED[:3])], max_num_running=3)
    for text, finished in outputs.values():
        parsed = parse_output(text)
        assert parsed.text == text and not parsed.calls and finished.reason in ("stop", "length")


@pytest.mark.parametrize("max_num_running", [1, 2], ids=["alone", "batched"])
def test_response_format_json_schema_output_validates(tiny_model: ChatModel, max_num_running: int) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "confidence"], "properties": {
        "answer": {"type": "string", "maxLength": 6}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}
    grammar = build_grammar((), ToolChoice("none"), response_format=ResponseFormat(schema, "answer", strict=True))
    requests = [request("greedy", grammar)] + [request(f"s{i}", grammar, **p) for i, p in enumerate(SAMPLED[:3])]
    for text, finished in run(tiny_model, requests, max_num_running=max_num_running).values():
        assert finished.reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_a_grammar_the_library_cannot_compile_is_refused_at_admission(tiny_model: ChatModel) -> None:
    engine = Engine(tiny_model)
    events: list[EngineEvent] = []
    grammar = build_grammar([FunctionTool("f", "", {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?=x)"}}})], ToolChoice("required"))
    engine.add_request(request("bad", grammar), events.append)
    assert len(events) == 1 and isinstance(events[0], Finished)
    assert (events[0].reason, events[0].code) == ("error", "unsupported_schema")
    assert "look-around" in (events[0].error or "")
    assert not engine.step()  # nothing started


def test_the_mask_allows_end_of_sequence_only_where_the_grammar_accepts() -> None:
    tokenizer = byte_level_tokenizer()
    eos = tokenizer.eos_token_id
    constraint = GrammarCompiler(tokenizer, {eos}).compile('start: "ab" | "abcd"')
    logits = torch.zeros(len(tokenizer) + 7)  # (vocab,), wider than the tokenizer as padded embeddings are
    for token_id in tokenizer.encode("ab"):
        masked = constraint.mask_logits(logits)
        assert masked[token_id] == 0 and masked[eos] == float("-inf") and masked[-7:].eq(float("-inf")).all()
        constraint.advance(token_id)
    masked = constraint.mask_logits(logits)
    assert constraint.is_accepting and not constraint.is_finished and masked[eos] == 0
    for token_id in tokenizer.encode("cd"):
        constraint.mask_logits(logits)
        constraint.advance(token_id)
    assert constraint.is_finished


def test_each_grammar_is_compiled_once_and_each_request_gets_its_own_state() -> None:
    tokenizer = byte_level_tokenizer()
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id}, max_cached=2)
    first, second = compiler.compile('start: "ab"'), compiler.compile('start: "ab"')
    assert len(compiler) == 1
    for token_id in tokenizer.encode("ab"):
        first.advance(token_id)
    assert first.is_finished and not second.is_finished
    compiler.compile('start: "c"'), compiler.compile('start: "d"')
    assert len(compiler) == 2  # the oldest went
    with pytest.raises(UnsupportedGrammar):
        compiler.compile("start: %json{\"type\": \"nonsense\"}")
