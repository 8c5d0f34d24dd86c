"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (streamed as server-sent events, or whole)
and ``GET /v1/models``. It shares the engine, and so its batching, with the Realtime socket.

The request is parsed by :mod:`assistant.chat_completions` (pure), its images are
decoded and checked in a worker thread exactly as on the socket
(:mod:`assistant.intake`), and a :class:`_Run` task feeds the engine's events to
the response. The run, not the response, owns the outcome: when the client
disconnects, the response aborts the engine request (it leaves the batch at the
next step) and the run still records what was generated, for ``store: true``.

Errors use OpenAI's HTTP error shape, ``{"error": {"message", "type", "param",
"code"}}``, with the codes of :mod:`assistant.errors` and the status of
:data:`HTTP_STATUS`. An error after the stream started is sent as one
``data: {"error": ...}`` event (the ``openai`` SDKs raise it), then ``[DONE]``.

While the server drains (:mod:`assistant.drain`) a new completion is refused with 503
``server_shutting_down`` (the SDKs retry it). A completion the drain cuts is stored
``incomplete`` (``server_shutdown``); its client gets the same ``server_shutting_down``
error: a 503 when it was not streamed, else as the stream's error event: the text it
already has is all there will be, and a retry goes to the server that comes back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from assistant import tools as tool_specs
from assistant.access import tenant_of
from assistant.chat_completions import (ChatCompletionRequest, CompletionIds, chunk_json, completion_json,
                                        parse_request, tool_calls_json, usage_chunk_json)
from assistant.engine.request import (ChatMessage, Finished, GenerationRequest, InlineImages, TextChunk, TokenDelta,
                                      ToolCallDelta)
from assistant.errors import (MODEL_ERROR, AssistantError, InternalError, InvalidValue, MessageTooLarge,
                              ServerShuttingDown, StorageUnavailable, engine_error)
from assistant.events import new_id
from assistant.intake import conversation_budget, validate_item
from assistant.items import ContentPart, Item, ResponseRecord, StoredImage
from assistant.prompts import StoreImages, build_messages
from assistant.response_run import CancelReason, log_outcome, status_of, usage_of
from assistant.tool_calls import ArgumentsDelta, CallDone, CallStarted, OutputEvent, TextDelta, ToolCallParser

if TYPE_CHECKING:
    from assistant.server import App

log = logging.getLogger(__name__)

# Status per error code; every other invalid_request_error is 400, every other server_error 500.
HTTP_STATUS = {
    "message_too_large": 413,
    "conversation_not_found": 404,
    "item_not_found": 404,
    "image_not_found": 404,
    "server_overloaded": 503,
    "rate_limit_exceeded": 429,
    "server_shutting_down": 503,
    "storage_unavailable": 503,
    "upstream_unavailable": 502,
}
FINISH_REASONS = {"stop": "stop", "length": "length"}
RunEvent = OutputEvent | Finished  # what a run hands the response: the parsed answer, then the outcome


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: AssistantError) -> JSONResponse:
    status = HTTP_STATUS.get(error.code, 500 if error.type == "server_error" else 400)
    return JSONResponse(error_body(error.message, error.type, error.code, error.param), status_code=status)


# ---------------------------------------------------------------- models


def _model_json(app: App) -> dict[str, Any]:
    return {"id": app.model_name, "object": "model", "created": 0, "owned_by": "assistant"}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_json(request.app.state.app)]})


async def get_model(request: Request) -> Response:
    app: App = request.app.state.app
    name = request.path_params["model"]
    if name != app.model_name:
        return JSONResponse(error_body(f"The model '{name}' does not exist; this server serves "
                                       f"'{app.model_name}'.", "invalid_request_error", "model_not_found",
                                       "model"), status_code=404)
    return JSONResponse(_model_json(app))


# ---------------------------------------------------------------- chat completions


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    generation: GenerationRequest
    conversation_id: str | None = None  # store: true
    may_call_tools: bool = False  # the answer goes through the tool-call parser


async def chat_completions(request: Request) -> Response:
    app: App = request.app.state.app
    tenant = tenant_of(request.scope)
    try:
        app.limits.acquire_response(tenant)  # counted from here to the run's end, so a refusal costs nothing
    except AssistantError as exc:
        return error_response(exc)
    run: _Run | None = None
    try:
        app.drain.admit()
        body = await _read_body(request, app.max_message_bytes)
        parsed = await asyncio.to_thread(parse_request, body)  # megabytes of base64 images: not on the loop
        prepared = await asyncio.to_thread(_prepare, app, parsed, tenant)
        run = _Run(app, prepared, on_end=functools.partial(app.limits.release_response, tenant))
    except AssistantError as exc:
        return error_response(exc)
    except Exception:
        log.exception("chat completion could not start")
        return error_response(InternalError())
    finally:
        if run is None:
            app.limits.release_response(tenant)
    ids = CompletionIds(model=parsed.model or app.model_name)
    first = await run.next_event(request)
    if first is None:  # the client left before the first token
        return Response(status_code=499)
    if isinstance(first, Finished) and (error := run.error_of(first)) is not None:
        return error_response(error)
    if parsed.stream:
        return _BoundedStream(_stream(run, ids, parsed, first), app.send_timeout_s, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **_conversation_header(prepared)})
    text: list[str] = []
    calls: list[CallDone] = []
    event: RunEvent | None = first
    while event is not None and not isinstance(event, Finished):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, CallDone):
            calls.append(event)
        event = await run.next_event(request)
    if event is None:  # the client left
        return Response(status_code=499)
    if (error := run.error_of(event)) is not None:
        return error_response(error)
    message: dict[str, Any] = {"content": "".join(text) if not calls else None}
    if calls:
        message["tool_calls"] = tool_calls_json([done.call for done in calls])
    return JSONResponse(completion_json(ids, message, _finish_reason(event, bool(calls)), usage_of(event),
                                        parsed.metadata if parsed.store else None),
                        headers=_conversation_header(prepared))


class _SlowReader(Exception):
    pass


class _BoundedStream(StreamingResponse):
    """Server-sent events to a client that must keep reading: a chunk that cannot be handed to the socket within
    ``send_timeout_s`` (the client reads nothing) ends the stream, which aborts the generation behind it, as the
    WebSocket's send timeout does (:mod:`assistant.websocket_protocol`); what stays buffered is the transport's."""

    def __init__(self, content: AsyncIterator[str], send_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                raise _SlowReader from None

        try:
            await super().__call__(scope, receive, bounded)
        except _SlowReader:
            log.info("dropped an HTTP client that read nothing for %.0f s", self.send_timeout_s)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # the stream's end aborts its run now


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise MessageTooLarge(f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(app: App, parsed: ChatCompletionRequest, tenant: str) -> _Prepared:
    """Worker thread: check the tools, decode and check every image, build the prompt; with ``store``, keep
    the messages as a new conversation (only once everything is valid: a refused request stores nothing)."""
    tools = tool_specs.parse_tools(parsed.tools) if parsed.tools is not None else ()
    choice = tool_specs.parse_tool_choice(parsed.tool_choice, tools)
    response_format = tool_specs.parse_response_format(parsed.response_format)
    items: list[Item] = []
    images: list[StoredImage] = []
    call_ids: set[str] = set()
    for index, message in enumerate(parsed.messages):
        param = f"messages[{index}]"
        result = parsed.tool_results.get(index)
        if result is not None:
            if result.tool_call_id not in call_ids:
                raise InvalidValue(f"'{param}.tool_call_id' names no tool call of an earlier assistant message.",
                                   param=f"{param}.tool_call_id")
            items.append(Item(new_id("item"), "user", type="function_call_output", call_id=result.tool_call_id,
                              output=result.content))
            continue
        item, item_images = validate_item(message, app.image_budget, param, "image_url.url")
        if item.content:
            items.append(item)
        images += item_images
        for call in parsed.tool_calls.get(index, ()):
            call_ids.add(call.id)
            items.append(Item(new_id("item"), "assistant", type="function_call", call_id=call.id, name=call.name,
                              arguments=call.arguments))
    image_parts = [part for item in items for part in item.content if part.is_image]
    if image_parts:
        conversation_budget(app.image_budget, image_parts, "messages")([])
    instructions = "" if parsed.has_system_message else app.defaults.instructions
    if app.renders_tools:  # the chat template describes the tools itself
        tools_prompt, template_tools = "", tool_specs.template_tools(tools, choice)
    else:
        tools_prompt = tool_specs.tools_prompt(tools, choice, parallel_tool_calls=parsed.parallel_tool_calls)
        template_tools = ()
    sampling = app.defaults.sampling.replace(**parsed.sampling)
    inline = {image.sha256: image.data for image in images}
    grammar = tool_specs.build_grammar(tools, choice, parallel_tool_calls=parsed.parallel_tool_calls,
                                       response_format=response_format)
    generation = GenerationRequest("", _with_system_text(build_messages(instructions, items), tools_prompt),
                                   sampling, image_source=InlineImages(inline), grammar=grammar,
                                   tools=template_tools, tool_choice=tool_specs.template_tool_choice(choice),
                                   response_format=response_format.to_openai() if response_format else None)
    conversation_id = None
    if parsed.store:
        conversation_id = app.store.create_conversation(metadata=parsed.metadata, tenant=tenant)
        stored: set[str] = set()
        for item in items:
            new_images = [image for image in images if image.sha256 in item.image_hashes and image.sha256 not in stored]
            stored.update(image.sha256 for image in new_images)
            app.store.add_item(conversation_id, item, None, new_images)
        generation = replace(generation, image_source=StoreImages(app.store, inline))
    return _Prepared(generation, conversation_id, tool_specs.calls_allowed(tools, choice))


def _with_system_text(messages: tuple[ChatMessage, ...], text: str) -> tuple[ChatMessage, ...]:
    """``text`` (the tools prompt) appended to the first system message, or as one before the rest."""
    if not text:
        return messages
    if messages and messages[0].role == "system":
        # One text, as the Realtime session writes instructions and tools: the chat template tokenizes each
        # chunk apart, so two chunks would give other tokens at the seam than one string.
        first = "".join(part.text for part in messages[0].parts if isinstance(part, TextChunk))
        return (ChatMessage("system", (TextChunk(f"{first}\n\n{text}"),)), *messages[1:])
    return (ChatMessage("system", (TextChunk(text),)), *messages)


def _conversation_header(prepared: _Prepared) -> dict[str, str]:
    """``store: true``: the conversation the exchange was kept as (resume it on /v1/realtime?conversation=)."""
    return {"X-Conversation-Id": prepared.conversation_id} if prepared.conversation_id else {}


async def _stream(run: _Run, ids: CompletionIds, parsed: ChatCompletionRequest,
                  first: RunEvent) -> AsyncIterator[str]:
    """Server-sent events; cancelled by Starlette when the client disconnects (the run is then aborted)."""
    include_usage = parsed.include_usage
    try:
        yield _sse(chunk_json(ids, {"role": "assistant", "content": ""}, include_usage=include_usage))
        event: RunEvent | None = first
        made_calls = False
        while event is not None and not isinstance(event, Finished):
            delta = _delta_of(event)
            made_calls = made_calls or isinstance(event, CallStarted)
            if delta:
                yield _sse(chunk_json(ids, delta, include_usage=include_usage))
            event = await run.next_event()
        assert event is not None
        if (error := run.error_of(event)) is not None:
            yield _sse(error_body(error.message, error.type, error.code, error.param))
        else:
            yield _sse(chunk_json(ids, {}, _finish_reason(event, made_calls), include_usage=include_usage))
            if include_usage:
                yield _sse(usage_chunk_json(ids, usage_of(event)))
        yield "data: [DONE]\n\n"
    finally:
        run.abort()  # a no-op when the run has finished


def _delta_of(event: OutputEvent) -> dict[str, Any] | None:
    """One parsed piece of the answer as a Chat Completions ``delta`` (None: nothing to send)."""
    match event:
        case TextDelta(text=text) if text:
            return {"content": text}
        case CallStarted(index=index, call_id=call_id, name=name):
            return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]}
        case ArgumentsDelta(index=index, delta=piece) if piece:
            return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
    return None


def _finish_reason(finished: Finished, made_calls: bool) -> str:
    if made_calls and finished.reason == "stop":
        return "tool_calls"
    return FINISH_REASONS.get(finished.reason, "stop")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Run:
    """One completion's generation, as a task the response reads from. It ends on its own (and stores the
    outcome, for ``store: true``) whether or not the client is still there."""

    _running: set[asyncio.Task[None]] = set()  # strong references until each run ends

    def __init__(self, app: App, prepared: _Prepared, on_end: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.prepared = prepared
        self.request_id = new_id("resp")
        self._events: asyncio.Queue[RunEvent] = asyncio.Queue()
        self._parser = ToolCallParser() if prepared.may_call_tools else None
        self._finished = False
        self._cancel_reason: CancelReason = "client_cancelled"
        task = asyncio.create_task(self._run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: on_end())
        app.drain.track(task, self.cut)

    async def next_event(self, request: Request | None = None) -> RunEvent | None:
        """The next piece of the answer, or the Finished that ends it; with ``request``, None when the client
        disconnects first (the run is then aborted)."""
        if request is None:
            return await self._events.get()
        getter = asyncio.ensure_future(self._events.get())
        watcher = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait((getter, watcher), return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        self.abort()
        return None

    def abort(self) -> None:
        if not self._finished:
            self.app.engine.abort(self.request_id)

    def cut(self) -> None:
        """The server's drain ends the run early: it is stored ``incomplete`` (``server_shutdown``)."""
        self._cancel_reason = "server_shutdown"
        self.abort()

    def error_of(self, finished: Finished) -> AssistantError | None:
        """What the client is told instead of a finish_reason: why generation failed, or that the drain cut it."""
        if finished.reason == "cancelled" and self._cancel_reason == "server_shutdown":
            return ServerShuttingDown("The server shut down before the answer was complete; retry once it is back.")
        return _error_of(finished) if finished.reason == "error" else None

    async def _run(self) -> None:
        started = time.monotonic()
        first_token_at: float | None = None
        text: list[str] = []
        calls: list[CallDone] = []
        finished = Finished(reason="error", error="engine stream ended without a terminal event")
        conversation_id = self.prepared.conversation_id
        is_started = False  # the response row exists
        try:
            if conversation_id is not None:
                await asyncio.to_thread(self.app.store.start_response, self.request_id, conversation_id)
                is_started = True
            request = replace(self.prepared.generation, request_id=self.request_id)
            async for event in self.app.engine.generate(request):
                if isinstance(event, TokenDelta):
                    first_token_at = first_token_at or time.monotonic()
                    self._put(self._parser.push(event.text) if self._parser else [TextDelta(event.text)], text,
                              calls)
                elif isinstance(event, ToolCallDelta):
                    first_token_at = first_token_at or time.monotonic()
                    if self._parser is not None:  # else no tools were offered: nothing to call
                        self._put(self._parser.push_call(event), text, calls)
                else:
                    finished = event
            if self._parser is not None:
                self._put(self._parser.finish(), text, calls)
        except AssistantError as exc:  # the engine refused the request (queue full)
            finished = Finished(reason="error", code=exc.code, error=exc.message)
        except Exception:
            log.exception("chat completion %s failed", self.request_id)
            self.app.engine.abort(self.request_id)
            finished = Finished(reason="error", error="internal error")
        finally:
            self._finished = True
            record = None
            if conversation_id is not None and is_started:
                finished, record = await asyncio.shield(self._store(conversation_id, "".join(text), calls, finished,
                                                                    started, first_token_at))
            log_outcome(record or self._record(finished, started, first_token_at), "chat completion",
                        conversation_id)
            self._events.put_nowait(finished)

    def _put(self, events: list[OutputEvent], text: list[str], calls: list[CallDone]) -> None:
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, CallDone):
                calls.append(event)
            self._events.put_nowait(event)

    def _record(self, finished: Finished, started: float, first_token_at: float | None) -> ResponseRecord:
        # As a Realtime response of the same outcome is stored.
        status, details = status_of(finished, self._cancel_reason)
        return ResponseRecord(self.request_id, self.prepared.conversation_id or "", status,
                              details.get("reason") if details else None, (), usage_of(finished),
                              None if first_token_at is None else (first_token_at - started) * 1000.0,
                              (time.monotonic() - started) * 1000.0)

    async def _store(self, conversation_id: str, text: str, calls: list[CallDone], finished: Finished,
                     started: float, first_token_at: float | None) -> tuple[Finished, ResponseRecord]:
        """Store the answer and outcome; returns the outcome the client is told and its record. When storage
        fails, that is a failure (storage_unavailable), and the writes that say so wait in the app's pending
        writes."""
        def outcome(finished: Finished) -> tuple[list[Item], ResponseRecord]:
            record = self._record(finished, started, first_token_at)
            item_status = "completed" if record.status == "completed" else "incomplete"
            items = [Item(item_id, "assistant", type="function_call", status=item_status, call_id=done.call.call_id,
                          name=done.call.name, arguments=done.call.arguments) for item_id, done in zip(call_ids, calls)]
            if has_message:
                items.append(Item(message_id, "assistant", (ContentPart("output_text", text=text),),
                                  status=item_status))
            return items, replace(record, output_item_ids=tuple(item.id for item in items))

        store = self.app.store
        call_ids, message_id = [new_id("item") for _ in calls], new_id("item")  # the same in either outcome
        has_message = not calls and bool(text or finished.reason == "stop")
        items, record = outcome(finished)
        num_added = 0
        try:
            for item in items:
                await asyncio.to_thread(store.add_item, conversation_id, item, response_id=self.request_id)
                num_added += 1
            await asyncio.to_thread(store.finish_response, record)
        except StorageUnavailable as exc:
            finished = replace(finished, reason="error", code=exc.code, error=exc.message)
            items, record = outcome(finished)
            for index, item in enumerate(items):
                write = (partial(store.update_item, conversation_id, item) if index < num_added else
                         partial(store.add_item, conversation_id, item, response_id=self.request_id))
                self.app.pending.add(f"item {item.id}", write)
            self.app.pending.add(f"response {self.request_id}", partial(store.finish_response, record))
        except Exception:
            log.exception("chat completion %s: could not store the result", self.request_id)
        return finished, record


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_of(finished: Finished) -> AssistantError:
    """A failed engine request as the client sees it (a generic message when the model itself failed)."""
    error = engine_error(finished.code, finished.error)
    if error is None:
        error = AssistantError("Generation failed inside the model; nothing was lost.", code=MODEL_ERROR)
        error.type = "server_error"
    return error
