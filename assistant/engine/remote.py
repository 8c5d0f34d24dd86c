"""A remote engine: generation on any server that speaks OpenAI's Chat Completions API (vLLM, TGI, SGLang,
llama.cpp's server, Ollama), behind the same contract as :class:`~assistant.engine.async_engine.AsyncEngine`.

``generate`` turns a :class:`GenerationRequest` into one streamed ``POST {url}/chat/completions``: the
messages as the conversation holds them (images as ``data:`` URLs of their stored bytes), the sampling
parameters, and the tools as OpenAI ``tools`` (the upstream renders and parses them: its ``tool_calls``
deltas come out as :class:`ToolCallDelta`, its text as :class:`TokenDelta`). The stream ends, as every
engine's does, in exactly one :class:`Finished`, with the usage the upstream reports (estimated when it
reports none: llama.cpp's Python server does not).

Invariants:

- each request is a task of its own with a connection of its own, so a slow or dead upstream stalls only
  the responses waiting on it; ``abort`` (a cancel, a client that left) cancels the task, which closes the
  connection, and every one of those servers stops generating when its client goes;
- nothing the upstream does raises into the caller: refused, unreachable, timed out (no byte for
  ``timeout`` seconds) or cut off, the request ends in a ``Finished`` with a code of
  :mod:`assistant.errors` (``upstream_unavailable``, ``server_overloaded``, ``context_length_exceeded``,
  ``invalid_prompt``); the upstream's own words go to the log, a 4xx's message also to the client;
- ``grammar`` is not sent (no common API takes one): the upstream holds calls to the tools' schemas,
  and answers to a ``response_format``, itself (vLLM, SGLang, llama.cpp and Ollama do; each needs its own
  tool-call parser switched on). The local engine's image cache and KV reuse do not apply; ``score`` is refused.

:class:`ChunkReader` (pure: lines of server-sent events in, engine events out) and :func:`chat_body`
(a request as the upstream's JSON body) are tested without sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any

import httpx2 as httpx

from assistant.engine.request import (ChatMessage, EngineEvent, Finished, FinishReason, GenerationRequest,
                                      ImageChunk, ScoreRequest, TextChunk, TokenDelta, ToolCallDelta)
from assistant.engine.scheduler import EngineOverloaded
from assistant.errors import MODEL_ERROR, NOT_SUPPORTED_BY_ENGINE, UPSTREAM_UNAVAILABLE
from assistant.tool_calls import parse_output

log = logging.getLogger(__name__)

# Image tokens a remote model is assumed to spend per image (OpenAI's: 85 at low detail, 765 for a
# 1024x1024 image at high): the conversation's image budgets count these; the upstream's usage counts its own.
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
CHARS_PER_TOKEN = 4  # the prompt-size estimate when the upstream reports no usage
MAX_ERROR_CHARS = 300  # of an upstream's error message, passed on to the client (4xx) or logged
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "tool_calls": "stop", "function_call": "stop",
                                           "eos": "stop", "length": "length", "content_filter": "stop"}
_TOOL_RESULT = re.compile(r"<tool_response>\n(.*?)\n</tool_response>(?:\n|$)", re.DOTALL)


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
    """The conversation in OpenAI's message shape. Earlier tool calls and their results reach the engine as
    the text the local model reads (:func:`assistant.prompts.build_messages`); they go upstream as
    ``tool_calls`` and ``tool`` messages again, so the upstream's chat template renders them its own way."""
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
            outputs = _tool_results(text)
            if outputs is not None and len(outputs) == len(pending_ids):
                result += [{"role": "tool", "tool_call_id": call_id, "content": output}
                           for call_id, output in zip(pending_ids, outputs)]
                pending_ids = []
                continue
        pending_ids = []
        result.append({"role": message.role, "content": _content(message, image_urls) if has_images else text})
    return result


def _tool_results(text: str) -> list[str] | None:
    """The outputs of a user turn made only of ``<tool_response>`` blocks; None when it is anything else."""
    outputs, position = [], 0
    while position < len(text):
        match = _TOOL_RESULT.match(text, position)
        if match is None:
            return None
        outputs.append(match.group(1))
        position = match.end()
    return outputs or None


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


# ---------------------------------------------------------------- the engine


class RemoteEngine:
    """The engine contract (``generate``, ``score``, ``abort``, ``shutdown``, ``is_running``) over HTTP.

    ``max_num_requests`` bounds the requests in flight; one more is refused with ``server_overloaded``.
    ``transport`` replaces the network in tests.
    """

    def __init__(self, url: str, model: str, *, api_key: str = "", timeout: float = 60.0,
                 max_num_requests: int = 72, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_num_requests = max_num_requests
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._running: dict[str, asyncio.Task[None]] = {}
        self._is_stopped = False

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def is_running(self) -> bool:
        return not self._is_stopped

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream the request's events, ending with its Finished; closing early aborts it.

        Raises EngineOverloaded (before any event) when ``max_num_requests`` are in flight.
        """
        if self._is_stopped or len(self._running) >= self.max_num_requests:
            raise EngineOverloaded(f"The server is busy ({len(self._running)} responses running); retry later.")
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        task = asyncio.create_task(self._stream(request, queue.put_nowait))
        self._running[request.request_id] = task
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            task.cancel()  # a no-op once it ended; else the consumer left: the upstream request ends too
            self._running.pop(request.request_id, None)

    async def _stream(self, request: GenerationRequest, emit: Callable[[EngineEvent], None]) -> None:
        """The upstream request; every way it ends is emitted as the one Finished."""
        reader: ChunkReader | None = None
        try:
            content, reader = await asyncio.to_thread(self._prepare, request)
            timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            async with httpx.AsyncClient(timeout=timeout, transport=self._transport) as client:
                async with client.stream("POST", f"{self.url}/chat/completions", content=content,
                                         headers={**self._headers, "Content-Type": "application/json"}) as response:
                    if response.status_code != 200:
                        error = error_of_status(response.status_code, await response.aread())
                        log.warning("the model server answered HTTP %d: %s", response.status_code, error.message)
                        emit(error.finished(reader))
                        return
                    async for line in response.aiter_lines():
                        for event in reader.feed(line):
                            emit(event)
                        if reader.is_done:
                            break
            emit(reader.finish())
        except asyncio.CancelledError:
            emit(reader.finished("cancelled") if reader is not None else Finished(reason="cancelled"))
        except UpstreamError as error:
            emit(error.finished(reader))
        except httpx.TimeoutException:
            log.warning("the model server at %s did not answer within %g s", self.url, self.timeout)
            emit(UpstreamError(UPSTREAM_UNAVAILABLE, f"The model server did not answer within {self.timeout:g} "
                               "s; retry later.").finished(reader))
        except httpx.HTTPError as exc:
            log.warning("the model server at %s cannot be reached: %s", self.url, exc)
            emit(UpstreamError(UPSTREAM_UNAVAILABLE, "The model server cannot be reached; retry later.")
                 .finished(reader))
        except Exception:
            log.exception("request %s to the model server failed", request.request_id)
            emit(Finished(reason="error", error="remote engine failure", code=MODEL_ERROR))

    def _prepare(self, request: GenerationRequest) -> tuple[bytes, ChunkReader]:
        """Worker thread: fetch and encode the images (megabytes of base64), serialize the body."""
        sha256s = image_sha256s(request)
        found = request.image_source(sha256s) if sha256s else {}
        missing = [sha256 for sha256 in sha256s if sha256 not in found]
        if missing:
            raise UpstreamError("image_not_found", "An image of the conversation was deleted while the response "
                                "waited; send the request again.")
        body = chat_body(request, self.model, {sha256: data_url(data) for sha256, data in found.items()})
        num_image_tokens = sum(IMAGE_TOKENS[part.detail] for message in request.messages for part in message.parts
                               if isinstance(part, ImageChunk))
        num_chars = sum(len(part.text) for message in request.messages for part in message.parts
                        if isinstance(part, TextChunk))
        return json.dumps(body).encode(), ChunkReader(num_prompt_chars=num_chars, num_image_tokens=num_image_tokens)

    async def score(self, request: ScoreRequest) -> Finished:
        return Finished(reason="error", code=NOT_SUPPORTED_BY_ENGINE,
                        error="image.match scores texts with the in-process model; this server generates with a "
                              "remote engine (--engine openai), which cannot.")

    def abort(self, request_id: str) -> None:
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    def shutdown(self) -> None:
        """Refuse new requests; the running ones end as their consumers leave (their tasks are cancelled)."""
        self._is_stopped = True
        for task in list(self._running.values()):
            task.cancel()


def upstream_model(url: str, api_key: str = "", timeout: float = 10.0) -> str:
    """The first model the upstream lists (``GET {url}/models``), for a server started without
    ``--engine-model``. Blocking; raises RuntimeError saying what to do when there is none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=timeout)
        response.raise_for_status()
        models = response.json().get("data") or []
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RuntimeError(f"cannot ask the model server at {url} which model it serves ({exc}); "
                           "pass --engine-model NAME") from None
