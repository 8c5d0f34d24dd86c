"""The OpenAI Chat Completions wire format as the remote engine (:mod:`assistant.engine.remote`) speaks it.
Pure: no sockets, no event loop.

- :func:`chat_body`: a :class:`GenerationRequest` as the streamed request's JSON body. Earlier tool calls and
  their results reach the engine as the text the local model reads (:func:`assistant.prompts.build_messages`);
  they go upstream as ``tool_calls`` and ``tool`` messages again, so the upstream's chat template renders
  them its own way. Images go as ``data:`` URLs of their stored bytes.
- :class:`ChunkReader`: the answer's server-sent event lines in, :class:`TokenDelta` and
  :class:`ToolCallDelta` out, then the one :class:`Finished` with the upstream's usage, or an estimate when it
  reports none (llama-cpp-python's server does not).
- :func:`error_of_status` and :class:`UpstreamError`: every way an upstream fails, as a code of
  :mod:`assistant.errors` a client may retry on; the upstream's own words are passed on only for a 4xx
  (about the request, not the server), shortened.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from assistant.engine.request import (ChatMessage, EngineEvent, Finished, FinishReason, GenerationRequest,
                                      ImageChunk, TextChunk, TokenDelta, ToolCallDelta)
from assistant.errors import UPSTREAM_UNAVAILABLE
from assistant.tool_calls import parse_output, parse_tool_results

log = logging.getLogger(__name__)

# Image tokens a remote model is assumed to spend per image (OpenAI's: 85 at low detail, 765 for a
# 1024x1024 image at high): the conversation's image budgets count these; the upstream's usage counts its own.
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
CHARS_PER_TOKEN = 4  # the prompt-size estimate when the upstream reports no usage
MAX_ERROR_CHARS = 300  # of an upstream's error message, passed on to the client (4xx) or logged
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "tool_calls": "stop", "function_call": "stop",
                                           "eos": "stop", "length": "length", "content_filter": "stop"}


class UpstreamError(Exception):
    """Why the upstream did not answer; becomes the request's ``Finished``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def finished(self, reader: ChunkReader | None = None) -> Finished:
        """The request's outcome: this error, with the usage so far."""
        base = reader.finished("error") if reader is not None else Finished(reason="error")
        return replace(base, error=self.message, code=self.code)


def error_of_status(status: int, body: bytes) -> UpstreamError:
    """An upstream's HTTP error answer as a coded error (what the client may read, and retry)."""
    detail = _error_message(body)
    if status in (400, 413, 422):
        if "context" in detail.lower() or "too long" in detail.lower() or status == 413:
            return UpstreamError("context_length_exceeded", f"The model server refused the conversation as too "
                                 f"long for its context: {detail}")
        return UpstreamError("invalid_prompt", f"The model server refused the conversation: {detail}")
    if status in (429, 503):
        return UpstreamError("server_overloaded", "The model server is busy; retry later.")
    return UpstreamError(UPSTREAM_UNAVAILABLE, f"The model server failed (HTTP {status}); retry later.")


def _error_message(body: bytes) -> str:
    """The ``error.message`` (or ``detail``, ``error``) of an error body, else its text; shortened."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        text = error if isinstance(error, str) else json.dumps(error)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


# ---------------------------------------------------------------- the request body


def chat_body(request: GenerationRequest, model: str, image_urls: Mapping[str, str]) -> dict[str, Any]:
    """The Chat Completions body of ``request``; ``image_urls`` maps each image's sha256 to its data URL."""
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": upstream_messages(request.messages, image_urls),
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": params.temperature,
        "top_p": params.top_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
    }
    if params.max_output_tokens is not None:
        body["max_tokens"] = params.max_output_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.repetition_penalty != 1.0:  # not OpenAI's; vLLM, SGLang and TGI read this name
        body["repetition_penalty"] = params.repetition_penalty
    if request.tools:
        body["tools"] = [dict(tool) for tool in request.tools]
        body["tool_choice"] = request.tool_choice
    if request.response_format is not None:
        body["response_format"] = dict(request.response_format)
    return body


def upstream_messages(messages: tuple[ChatMessage, ...], image_urls: Mapping[str, str]) -> list[dict[str, Any]]:
    """The conversation in OpenAI's message shape, calls and their results as ``tool_calls`` and ``tool``."""
    result: list[dict[str, Any]] = []
    pending_ids: list[str] = []  # the ids of the calls of the message before, awaiting their results
    for index, message in enumerate(messages):
        text = "".join(part.text for part in message.parts if isinstance(part, TextChunk))
        has_images = any(isinstance(part, ImageChunk) for part in message.parts)
        if message.role == "assistant" and not has_images:
            parsed = parse_output(text, new_id=lambda: "")
            if parsed.calls and not parsed.text:
                pending_ids = [f"call_{index}_{number}" for number in range(len(parsed.calls))]
                result.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call_id, call in zip(pending_ids, parsed.calls)]})
                continue
        if message.role == "user" and pending_ids and not has_images:
            outputs = parse_tool_results(text)
            if outputs is not None and len(outputs) == len(pending_ids):
                result += [{"role": "tool", "tool_call_id": call_id, "content": output}
                           for call_id, output in zip(pending_ids, outputs)]
                pending_ids = []
                continue
        pending_ids = []
        result.append({"role": message.role, "content": _content(message, image_urls) if has_images else text})
    return result


def _content(message: ChatMessage, image_urls: Mapping[str, str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextChunk):
            parts.append({"type": "text", "text": part.text})
        else:
            parts.append({"type": "image_url", "image_url": {"url": image_urls[part.sha256], "detail": part.detail}})
    return parts


def image_sha256s(request: GenerationRequest) -> list[str]:
    return list(dict.fromkeys(part.sha256 for message in request.messages for part in message.parts
                              if isinstance(part, ImageChunk)))


def data_url(data: bytes) -> str:
    """Stored image bytes (PNG, JPEG or WebP: :mod:`assistant.images` keeps no other) as a data URL."""
    mime = "image/png"
    if data.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------- the answer


class ChunkReader:
    """One streamed answer: lines of server-sent events in (:meth:`feed`), engine events out; then the
    ``Finished`` with the upstream's usage, or an estimate from ``num_prompt_chars`` and the chunks seen."""

    def __init__(self, *, num_prompt_chars: int = 0, num_image_tokens: int = 0) -> None:
        self.num_prompt_chars = num_prompt_chars
        self.num_image_tokens = num_image_tokens
        self.is_done = False  # [DONE] was read
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.num_chunks = 0  # with text or call arguments: about one token each

    def feed(self, line: str) -> list[EngineEvent]:
        """One line of the stream; raises UpstreamError when the upstream sends an error instead of chunks."""
        if not line.startswith("data:"):  # blank lines, comments, "event:" and "id:" lines
            return []
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.is_done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamError(UPSTREAM_UNAVAILABLE, "The model server sent a malformed stream; retry later.") \
                from None
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk:
            log.warning("the model server failed mid-answer: %s", _error_message(data.encode()))
            raise UpstreamError(UPSTREAM_UNAVAILABLE, "The model server failed mid-answer; retry later.")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        events: list[EngineEvent] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") + (delta.get("refusal") or "")
            if text:
                self.num_chunks += 1
                events.append(TokenDelta(text, 1))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                self.num_chunks += 1
                events.append(ToolCallDelta(int(call.get("index", 0)), function.get("name"),
                                            function.get("arguments") or ""))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> Finished:
        """The stream ended: its outcome. One that stopped before it said how it ended was cut off."""
        if self.finish_reason is None and not self.is_done:
            raise UpstreamError(UPSTREAM_UNAVAILABLE, "The model server closed the stream mid-answer; retry later.")
        return self.finished(FINISH_REASONS.get(self.finish_reason or "stop", "stop"))

    def finished(self, reason: FinishReason) -> Finished:
        """A ``Finished`` with ``reason`` and the usage so far."""
        usage = self.usage or {}
        num_prompt = usage.get("prompt_tokens")
        if not isinstance(num_prompt, int):
            num_prompt = self.num_prompt_chars // CHARS_PER_TOKEN + self.num_image_tokens
        num_output = usage.get("completion_tokens")
        if not isinstance(num_output, int):
            num_output = self.num_chunks
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Finished(reason=reason, num_prompt_tokens=num_prompt, num_output_tokens=num_output,
                        num_image_tokens=self.num_image_tokens,
                        num_cached_tokens=cached if isinstance(cached, int) else 0)
