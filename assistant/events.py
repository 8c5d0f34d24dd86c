"""Server events of the Realtime protocol: build them as dicts, in either dialect.

:class:`EventWriter` knows the dialect of one connection and gives every event a
unique ``event_id``. GA names are canonical; the beta dialect (``OpenAI-Beta:
realtime=v1``) renames a few events, spells assistant parts ``text`` instead of
``output_text``, names session fields ``modalities`` / ``max_response_output_tokens``,
has no ``conversation.item.done`` (it is simply not sent) and no ``name`` in
``response.function_call_arguments.done`` (the call's item has it).

Every event validates against the ``openai`` SDK's own pydantic types of its dialect
(``tests/test_server_sdk_types.py``), as clients such as the Agents SDK validate them;
only our documented extensions are undeclared fields there. So the beta session carries
no ``model``: the beta type admits only OpenAI's model names. (Beta content parts have no
image type; an image a beta client sends comes back as ``input_image``, outside them.)

Items are messages (``role``, ``status``, ``content``), function calls (``status``,
``call_id``, ``name``, ``arguments``) or function call outputs (``call_id``, ``output``),
each in the SDK's shape for its type. Tools are echoed in Realtime's flat shape
(``{type: "function", name, description, parameters}``), ``tool_choice`` as a string or
``{type: "function", name}``.

Images in items: ``conversation.item.retrieved`` carries the full ``data:`` URL;
``conversation.item.added``/``done`` carry only our extension field
``image_sha256`` so a 10 MB image is not echoed back on every create.

``image.match.result`` (extension, answering ``image.match``; no SDK type knows it):
``client_event_id`` (the client's ``event_id`` or null), ``scoring`` (what ``score`` is:
"likelihood" or "gain"), ``scores`` (one per text, in the texts' order: ``index``,
``text``, ``score``, ``log_likelihood``, ``log_likelihood_without_image``, ``num_tokens``)
and ``ranking`` (indices, best first).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from assistant.engine.request import MatchScore, ranking
from assistant.engine.sampling import SamplingParams
from assistant.errors import AssistantError
from assistant.items import ContentPart, Item, Usage
from assistant.tools import FunctionTool, ToolChoice


class Dialect(Enum):
    GA = "ga"
    BETA = "beta"


_BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
_BETA_DROPPED = frozenset({"conversation.item.done"})
_BETA_DROPPED_FIELDS = {"response.function_call_arguments.done": ("name",)}  # beta names the call in its item only


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass(frozen=True)
class SessionView:
    """What ``session.created``/``session.updated`` report (effective values)."""

    id: str
    model: str
    conversation_id: str
    instructions: str
    sampling: SamplingParams  # max_output_tokens None = "inf"
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice("auto"))
    cancel_on_disconnect: bool = False  # extension: a dropped connection cancels its response


class EventWriter:
    """Builds server events for one connection's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    def event(self, type_: str, **fields: Any) -> dict[str, Any] | None:
        """One event, or None when the dialect has no such event."""
        if self.dialect is Dialect.BETA:
            if type_ in _BETA_DROPPED:
                return None
            fields = {k: v for k, v in fields.items() if k not in _BETA_DROPPED_FIELDS.get(type_, ())}
            type_ = _BETA_NAMES.get(type_, type_)
        return {"type": type_, "event_id": new_id("event"), **fields}

    def error(self, exc: AssistantError) -> dict[str, Any]:
        event = self.event("error", error=exc.to_wire())
        assert event is not None
        return event

    # ------------------------------------------------------------ objects

    def session(self, view: SessionView) -> dict[str, Any]:
        sampling = view.sampling
        max_tokens: int | str = "inf" if sampling.max_output_tokens is None else sampling.max_output_tokens
        common = {
            "id": view.id,
            "object": "realtime.session",
            "instructions": view.instructions,
            "tools": [tool_json(tool) for tool in view.tools],
            "tool_choice": tool_choice_json(view.tool_choice),
            # Extensions (additive):
            "conversation_id": view.conversation_id,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            "stop": list(sampling.stop),
            "frequency_penalty": sampling.frequency_penalty,
            "presence_penalty": sampling.presence_penalty,
            "repetition_penalty": sampling.repetition_penalty,
            "cancel_on_disconnect": view.cancel_on_disconnect,
        }
        if self.dialect is Dialect.BETA:
            return {**common, "modalities": ["text"], "max_response_output_tokens": max_tokens}
        return {"type": "realtime", **common, "model": view.model, "output_modalities": ["text"],
                "max_output_tokens": max_tokens}

    def part(self, part: ContentPart, image_url: Callable[[str], str] | None = None) -> dict[str, Any]:
        if part.is_image:
            wire: dict[str, Any] = {"type": "input_image", "detail": part.detail, "image_sha256": part.image_sha256}
            if image_url is not None and part.image_sha256:
                wire["image_url"] = image_url(part.image_sha256)
            return wire
        kind = part.type
        if kind == "output_text" and self.dialect is Dialect.BETA:
            kind = "text"
        return {"type": kind, "text": part.text or ""}

    def item(self, item: Item, image_url: Callable[[str], str] | None = None) -> dict[str, Any]:
        head = {"id": item.id, "object": "realtime.item", "type": item.type}
        if item.type == "function_call":
            return {**head, "status": item.status, "call_id": item.call_id, "name": item.name,
                    "arguments": item.arguments or ""}
        if item.type == "function_call_output":
            return {**head, "call_id": item.call_id, "output": item.output or ""}
        return {**head, "role": item.role, "status": item.status,
                "content": [self.part(p, image_url) for p in item.content]}

    def response(
        self,
        response_id: str,
        conversation_id: str | None,  # None for an out-of-band response (conversation "none")
        status: str,
        *,
        output: list[Item] | None = None,
        usage: Usage | None = None,
        status_details: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        max_output_tokens: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": response_id,
            "object": "realtime.response",
            "conversation_id": conversation_id,
            "status": status,
            "status_details": status_details,
            "output": [self.item(i) for i in output or []],
            "metadata": metadata,
            "usage": None if usage is None else usage_json(usage),
        }
        max_tokens: int | str = "inf" if max_output_tokens is None else max_output_tokens
        if self.dialect is Dialect.BETA:
            body.update(modalities=["text"], max_output_tokens=max_tokens)
        else:
            body.update(output_modalities=["text"], max_output_tokens=max_tokens)
        return body


def tool_json(tool: FunctionTool) -> dict[str, Any]:
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": dict(tool.parameters)}


def tool_choice_json(choice: ToolChoice) -> str | dict[str, str]:
    if choice.mode == "function":
        assert choice.name is not None
        return {"type": "function", "name": choice.name}
    return choice.mode


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "input_token_details": {
            "cached_tokens": usage.cached_tokens,
            "text_tokens": usage.text_tokens,
            "image_tokens": usage.image_tokens,
            "audio_tokens": 0,
            # Extension: how many of the image tokens came from the embedding cache.
            "cached_tokens_details": {"text_tokens": usage.cached_tokens - usage.cached_image_tokens,
                                      "image_tokens": usage.cached_image_tokens, "audio_tokens": 0},
        },
        "output_token_details": {"text_tokens": usage.output_tokens, "audio_tokens": 0},
    }


def match_result_json(scoring: str, scores: Sequence[MatchScore]) -> dict[str, Any]:
    """The ``scoring``, ``scores`` and ``ranking`` fields of ``image.match.result``."""
    return {
        "scoring": scoring,
        "scores": [{"index": s.index, "text": s.text, "score": s.score, "log_likelihood": s.log_likelihood,
                    "log_likelihood_without_image": s.log_likelihood_without_image, "num_tokens": s.num_tokens}
                   for s in scores],
        "ranking": ranking(scores),
    }
