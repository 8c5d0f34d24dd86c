"""OpenAI Chat Completions, the wire format: request bodies → domain values, results → response JSON.

Pure: no sockets, no store, no tensors (the HTTP layer, :mod:`assistant.http_api`,
does the I/O). Parsing raises the same coded errors as the Realtime protocol
(:mod:`assistant.errors`), with ``param`` the path inside the body
(``messages[1].content[0].image_url.url``).

What is read: ``model``, ``messages`` (roles ``system``, ``developer``, ``user``,
``assistant``, ``tool``; content a string or parts of type ``text`` and
``image_url`` with data URLs), ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``frequency_penalty``,
``presence_penalty``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only),
``user``, ``metadata``, ``store``, and the tool-calling fields (``tools``,
``tool_choice``, ``parallel_tool_calls``, ``response_format``), which are kept raw for
:mod:`assistant.tools`. Every other field is ignored, as clients send many.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from assistant.engine.sampling import check_sampling_value
from assistant.errors import InvalidType, InvalidValue, MissingParameter
from assistant.events import new_id
from assistant.items import DETAILS, Usage
from assistant.protocol import (MAX_TEXT_CHARS, ImageInput, ItemInput, TextInput, check_unicode, get_field,
                                read_json)
from assistant.tool_calls import ToolCall

MAX_MESSAGES = 2048
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_USER_CHARS = 256
FLOAT_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCallInput:
    """A tool call the assistant made earlier in the conversation, as the client sends it back."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResultInput:
    """A ``tool`` message: the result of the call ``tool_call_id``."""

    tool_call_id: str
    content: str


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A parsed request. ``messages`` are items in order (system and developer messages as ``system``);
    an assistant message's earlier tool calls and ``tool`` results are in ``tool_calls`` / ``tool_results``,
    keyed by the message's index."""

    model: str
    messages: tuple[ItemInput, ...]
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingParams fields, range-checked
    stream: bool = False
    include_usage: bool = False
    store: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    has_system_message: bool = False
    tool_calls: Mapping[int, tuple[ToolCallInput, ...]] = field(default_factory=dict)
    tool_results: Mapping[int, ToolResultInput] = field(default_factory=dict)
    tools: Any = None  # raw; assistant.tools validates them
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: Any = None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request body → a ChatCompletionRequest, or a coded error naming the field."""
    data = read_json(body, "the request body must be a JSON object")
    if not isinstance(data, dict):
        raise InvalidType("The request body must be a JSON object.")
    check_unicode(data, "")
    model = get_field(data, "model", str, "", required=False) or ""
    raw_messages = get_field(data, "messages", list, "")
    if not raw_messages:
        raise InvalidValue("'messages' must hold at least one message.", param="messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise InvalidValue(f"'messages' holds {len(raw_messages)} messages; at most {MAX_MESSAGES} are accepted.",
                           param="messages")
    messages: list[ItemInput] = []
    tool_calls: dict[int, tuple[ToolCallInput, ...]] = {}
    tool_results: dict[int, ToolResultInput] = {}
    has_system = False
    for index, raw in enumerate(raw_messages):
        prefix = f"messages[{index}]"
        message, calls, result = _parse_message(raw, prefix)
        has_system = has_system or message.role == "system"
        if calls:
            tool_calls[index] = calls
        if result is not None:
            tool_results[index] = result
        messages.append(message)
    n = get_field(data, "n", int, "", required=False)
    if n is not None and n != 1:
        raise InvalidValue("'n' must be 1: this server generates one choice per request.", param="n")
    stream = bool(get_field(data, "stream", bool, "", required=False))
    stream_options = get_field(data, "stream_options", dict, "", required=False) or {}
    include_usage = bool(get_field(stream_options, "include_usage", bool, "stream_options.", required=False))
    parallel = get_field(data, "parallel_tool_calls", bool, "", required=False)
    return ChatCompletionRequest(
        model=model, messages=tuple(messages), sampling=_parse_sampling(data), stream=stream,
        include_usage=include_usage, store=bool(get_field(data, "store", bool, "", required=False)),
        metadata=_parse_metadata(data), user=_parse_user(data), has_system_message=has_system,
        tool_calls=tool_calls, tool_results=tool_results, tools=data.get("tools"),
        tool_choice=data.get("tool_choice"), parallel_tool_calls=True if parallel is None else parallel,
        response_format=data.get("response_format"),
    )


def _parse_message(raw: Any, prefix: str) -> tuple[ItemInput, tuple[ToolCallInput, ...], ToolResultInput | None]:
    if not isinstance(raw, dict):
        raise InvalidType(f"'{prefix}' must be an object.", param=prefix)
    p = f"{prefix}."
    role = get_field(raw, "role", str, p)
    if role not in ROLES:
        raise InvalidValue(f"'{p}role' must be one of {', '.join(ROLES)}.", param=f"{p}role")
    calls = _parse_tool_calls(raw, p) if role == "assistant" else ()
    content = raw.get("content")
    if content is None and not calls:
        raise MissingParameter(f"Missing required parameter '{p}content'.", param=f"{p}content")
    parts = _parse_content(content, role, f"{p}content") if content is not None else ()
    if role == "tool":
        call_id = get_field(raw, "tool_call_id", str, p)
        text = "".join(part.text for part in parts if isinstance(part, TextInput))
        return ItemInput(None, "user", parts), (), ToolResultInput(call_id, text)
    item_role = "system" if role in ("system", "developer") else role
    return ItemInput(None, item_role, parts), calls, None


def _parse_content(content: Any, role: str, prefix: str) -> tuple[TextInput | ImageInput, ...]:
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return (TextInput(text_type, _check_text(content, prefix)),)
    if not isinstance(content, list):
        raise InvalidType(f"'{prefix}' must be a string or an array of content parts.", param=prefix)
    parts: list[TextInput | ImageInput] = []
    for index, part in enumerate(content):
        part_prefix = f"{prefix}[{index}]"
        if not isinstance(part, dict):
            raise InvalidType(f"'{part_prefix}' must be an object.", param=part_prefix)
        kind = get_field(part, "type", str, f"{part_prefix}.")
        if kind == "text" or (kind == "refusal" and role == "assistant"):
            key = "text" if kind == "text" else "refusal"
            parts.append(TextInput(text_type, _check_text(get_field(part, key, str, f"{part_prefix}."),
                                                          f"{part_prefix}.{key}")))
        elif kind == "image_url" and role == "user":
            image = get_field(part, "image_url", dict, f"{part_prefix}.")
            url = get_field(image, "url", str, f"{part_prefix}.image_url.")
            detail = get_field(image, "detail", str, f"{part_prefix}.image_url.", required=False) or "auto"
            if detail not in DETAILS:
                raise InvalidValue(f"'{part_prefix}.image_url.detail' must be one of {', '.join(DETAILS)}.",
                                   param=f"{part_prefix}.image_url.detail")
            parts.append(ImageInput(url, detail))
        else:
            allowed = "text and image_url" if role == "user" else "text"
            raise InvalidValue(f"'{part_prefix}.type' {kind!r} is not accepted in a {role} message; this server "
                               f"takes {allowed} parts there.", param=f"{part_prefix}.type")
    return tuple(parts)


def _check_text(text: str, param: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidValue(f"'{param}' has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted.",
                           param=param)
    return text


def _parse_tool_calls(raw: dict[str, Any], prefix: str) -> tuple[ToolCallInput, ...]:
    calls = get_field(raw, "tool_calls", list, prefix, required=False) or []
    parsed = []
    for index, call in enumerate(calls):
        p = f"{prefix}tool_calls[{index}]."
        if not isinstance(call, dict):
            raise InvalidType(f"'{p[:-1]}' must be an object.", param=p[:-1])
        function = get_field(call, "function", dict, p)
        parsed.append(ToolCallInput(get_field(call, "id", str, p), get_field(function, "name", str, f"{p}function."),
                                    get_field(function, "arguments", str, f"{p}function.")))
    return tuple(parsed)


def _parse_sampling(data: dict[str, Any]) -> dict[str, Any]:
    sampling: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = data.get(key)
        if value is not None and "max_output_tokens" not in sampling:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValue(f"'{key}' must be a positive integer.", param=key)
            sampling["max_output_tokens"] = value
    for name in FLOAT_FIELDS:
        value = get_field(data, name, float, "", required=False)
        if value is not None:
            sampling[name] = value
    seed = get_field(data, "seed", int, "", required=False)
    if seed is not None:
        sampling["seed"] = seed
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidType("'stop' must be a string or an array of strings.", param="stop")
        sampling["stop"] = tuple(stops)
    for name, value in sampling.items():
        problem = check_sampling_value(name, value)
        if problem:
            param = "max_tokens" if name == "max_output_tokens" else name
            raise InvalidValue(f"'{param}' {problem}.", param=param)
    return sampling


def _parse_metadata(data: dict[str, Any]) -> dict[str, str] | None:
    metadata = get_field(data, "metadata", dict, "", required=False)
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidValue(f"'metadata' holds {len(metadata)} keys; at most {MAX_METADATA_KEYS}.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidValue(f"'metadata' maps keys of up to {MAX_METADATA_KEY_CHARS} characters to strings of "
                               f"up to {MAX_METADATA_VALUE_CHARS}.", param=f"metadata.{key}")
    return dict(metadata)


def _parse_user(data: dict[str, Any]) -> str | None:
    user = get_field(data, "user", str, "", required=False)
    if user is not None and len(user) > MAX_USER_CHARS:
        raise InvalidValue(f"'user' has {len(user)} characters; at most {MAX_USER_CHARS}.", param="user")
    return user


# ---------------------------------------------------------------- responses


@dataclass
class CompletionIds:
    """What every chunk of one completion repeats."""

    model: str
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0,
                                  "image_tokens": usage.image_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def chunk_json(ids: CompletionIds, delta: dict[str, Any], finish_reason: str | None = None,
               *, include_usage: bool = False) -> dict[str, Any]:
    chunk = {**ids.head("chat.completion.chunk"),
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None  # every chunk but the last, as OpenAI sends them
    return chunk


def usage_chunk_json(ids: CompletionIds, usage: Usage) -> dict[str, Any]:
    return {**ids.head("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """A whole answer's tool calls as a Chat Completions message's ``tool_calls``."""
    return [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]


def completion_json(ids: CompletionIds, message: dict[str, Any], finish_reason: str, usage: Usage,
                    metadata: dict[str, str] | None = None) -> dict[str, Any]:
    completion = {**ids.head("chat.completion"),
                  "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, "annotations": [],
                                                       **message},
                               "logprobs": None, "finish_reason": finish_reason}],
                  "usage": usage_json(usage), "service_tier": "default"}
    if metadata is not None:
        completion["metadata"] = metadata
    return completion
