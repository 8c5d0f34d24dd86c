"""One response, from ``response.created`` to ``response.done``: engine events in → output items, store writes
and server events out.

The session validates ``response.create``, prepares the :class:`GenerationRequest` and starts the response
record; a :class:`ResponseRun` does the rest. Like the session it never touches a socket (it gets an async
``send``: its conversation's :meth:`~assistant.replay.LiveConversation.publish`, which keeps the events for
replay and passes them to the connection attached, if any) nor a tensor (it reads the engine's event stream,
which ends in one ``Finished``). It does not know its connection, so a dropped one does not stop it.

Output items, in ``output_index`` order as they appear:

- without tools, one message item, announced before the first token, as it always was;
- with tools, the text goes through :class:`~assistant.tool_calls.ToolCallParser`: plain text becomes one
  message item, announced when its first text arrives; each call becomes its own ``function_call`` item,
  announced when its name is known, its arguments streamed as ``response.function_call_arguments.delta``
  and closed by ``response.function_call_arguments.done`` as soon as the call is complete. A response
  that produced neither text nor a call ends with an empty message item.

Invariants:

- every output item is stored (when the response is in the conversation) before it is announced, as
  ``in_progress``, and stored again when it ends: ``completed``, or ``incomplete`` when the response did
  not complete; a call cut short (cancelled, out of tokens) is ``incomplete`` with the arguments it has;
- while it streams, the text of each open item is saved at least every :data:`~assistant.flusher.FLUSH_INTERVAL_S`
  (a :class:`~assistant.flusher.Flusher`), so a crash loses at most that much of it;
- every announced item gets its done events, and the response exactly one ``response.done``, also when the
  response is cancelled or fails; the outcome is stored first, so a client that left loses nothing;
- when storage fails (a write raises ``StorageUnavailable``), generation stops and the response fails with
  ``storage_unavailable``, its open items ``incomplete`` with the text the client received; the final writes
  that could not land are retried in order in the background (:class:`~assistant.pending_writes.PendingWrites`),
  so once storage is back the database says what the client was told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

from assistant.engine.request import Finished, GenerationRequest, TokenDelta, ToolCallDelta
from assistant.errors import MODEL_ERROR, AssistantError, StorageUnavailable, engine_error
from assistant.events import EventWriter, new_id
from assistant.flusher import Flusher
from assistant.items import ContentPart, Item, ItemStatus, ResponseRecord, Usage
from assistant.pending_writes import PendingWrites
from assistant.store import Store
from assistant.tool_calls import ArgumentsDelta, CallDone, CallStarted, OutputEvent, TextDelta, ToolCallParser

log = logging.getLogger(__name__)
Send = Callable[[dict[str, Any]], Awaitable[None]]
# Why a response was cancelled: its client asked (or left), or the server's drain cut it short.
CancelReason = Literal["client_cancelled", "server_shutdown"]


@dataclass
class _Output:
    """One output item while the response runs."""

    index: int  # output_index
    item: Item  # as last stored
    previous_item_id: str | None  # in the conversation (None when first, or out of band)
    pieces: list[str] = field(default_factory=list)  # a message's text, or a call's arguments, so far
    num_saved: int = 0  # how many of the pieces the store has
    is_done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ResponseRun:
    """One running response; :meth:`run` once, :meth:`cancel` at any time (also before :meth:`run`)."""

    def __init__(
        self,
        response_id: str,
        *,
        store: Store,
        pending: PendingWrites,  # where final writes go when storage fails
        engine: Any,  # AsyncEngine: generate(request) -> AsyncIterator[EngineEvent], abort(request_id)
        writer: EventWriter,
        send: Send,
        conversation_id: str,
        in_conversation: bool,  # False: conversation "none", nothing is added to the conversation
        calls_tools: bool,  # the model may answer with tool calls: its text is parsed for them
        metadata: dict[str, str] | None = None,
        max_output_tokens: int | None = None,  # as reported in the response object; None = "inf"
        rate_limits: list[dict[str, Any]] | None = None,  # sent as rate_limits.updated after response.created
    ) -> None:
        self.rate_limits = rate_limits
        self.id = response_id
        self.store = store
        self.pending = pending
        self.engine = engine
        self.writer = writer
        self._send_event = send
        self.conversation_id = conversation_id
        self.in_conversation = in_conversation
        self.metadata = metadata
        self.max_output_tokens = max_output_tokens
        self._parser = ToolCallParser() if calls_tools else None
        self._outputs: list[_Output] = []
        self._message: _Output | None = None
        self._calls: dict[int, _Output] = {}  # by the parser's call index
        # Set by a cancel, a disconnect or the drain, any of which may come before the engine knows the request.
        self._cancel_reason: CancelReason | None = None
        self._started = time.monotonic()
        self._first_token_at: float | None = None
        self._storage_error: StorageUnavailable | None = None  # set when a write failed: the response stops
        self._store_lock = asyncio.Lock()  # an item's snapshot and its final state are written one at a time

    def cancel(self, reason: CancelReason = "client_cancelled") -> None:
        """End the response early; the first reason given is the one it ends with."""
        self._cancel_reason = self._cancel_reason or reason
        self.engine.abort(self.id)

    async def run(self, request: GenerationRequest) -> None:
        """Stream the response to its end; never raises (a failure ends it as ``failed``)."""
        finished = Finished(reason="error", error="engine stream ended without a terminal event")
        flusher = Flusher(self._save_progress)
        if self.in_conversation:
            flusher.start()
        try:
            await self._send("response.created", response=self._response_json("in_progress"))
            if self.rate_limits is not None:
                await self._send("rate_limits.updated", rate_limits=self.rate_limits)
            if self._parser is None:
                await self._open_message()
            if self._cancel_reason is not None:  # cancelled before the engine saw the request
                finished = Finished(reason="cancelled")
            else:
                async for engine_event in self.engine.generate(request):
                    if isinstance(engine_event, TokenDelta):
                        if self._first_token_at is None:
                            self._first_token_at = time.monotonic()
                        if engine_event.text:
                            await self._on_text(engine_event.text)
                    elif isinstance(engine_event, ToolCallDelta):
                        if self._first_token_at is None:
                            self._first_token_at = time.monotonic()
                        if self._parser is not None:  # else no tools were offered: nothing to call
                            for output_event in self._parser.push_call(engine_event):
                                await self._on_output(output_event)
                    else:
                        finished = engine_event
            if self._parser is not None:
                for output_event in self._parser.finish():
                    await self._on_output(output_event, is_cut_short=True)
        except StorageUnavailable as exc:  # an output item could not be stored
            self._stop_for_storage(exc)
        except AssistantError as exc:  # the engine refused the request (queue full)
            finished = Finished(reason="error", code=exc.code, error=exc.message)
        except Exception:
            log.exception("response %s failed", self.id)
            self.engine.abort(self.id)
            finished = Finished(reason="error", error="internal error")
        finally:
            await asyncio.shield(self._end(flusher, finished))

    async def _end(self, flusher: Flusher, finished: Finished) -> None:
        await flusher.stop()
        await self._finish(finished)

    def _stop_for_storage(self, error: StorageUnavailable) -> None:
        if self._storage_error is None:
            log.warning("response %s stops: its output cannot be stored", self.id)
            self._storage_error = error
        self.engine.abort(self.id)

    # ------------------------------------------------------------ output items

    async def _on_text(self, text: str) -> None:
        events: list[OutputEvent] = [TextDelta(text)] if self._parser is None else self._parser.push(text)
        for output_event in events:
            await self._on_output(output_event)

    async def _on_output(self, event: OutputEvent, *, is_cut_short: bool = False) -> None:
        match event:
            case TextDelta(text=text):
                message = self._message or await self._open_message()
                message.pieces.append(text)
                await self._send("response.output_text.delta", **self._refs(message), content_index=0, delta=text)
            case CallStarted(index=index, call_id=call_id, name=name):
                item = Item(new_id("item"), "assistant", status="in_progress", type="function_call",
                            call_id=call_id, name=name, arguments="")
                self._calls[index] = await self._open(item)
            case ArgumentsDelta(index=index, delta=delta):
                call = self._calls[index]
                call.pieces.append(delta)
                await self._send("response.function_call_arguments.delta", **self._refs(call),
                                 call_id=call.item.call_id, delta=delta)
            case CallDone(index=index):
                call = self._calls[index]
                if await self._store_end(call, "incomplete" if is_cut_short else "completed"):
                    await self._send_done(call)

    async def _open_message(self) -> _Output:
        self._message = await self._open(Item(new_id("item"), "assistant", (), status="in_progress"))
        return self._message

    async def _open(self, item: Item) -> _Output:
        """Store the item as in progress, then announce it."""
        previous = None
        if self.in_conversation:
            previous = await asyncio.to_thread(self.store.add_item, self.conversation_id, item, response_id=self.id)
        output = _Output(len(self._outputs), item, previous)
        self._outputs.append(output)
        wire = self.writer.item(item)
        await self._send("response.output_item.added", response_id=self.id, output_index=output.index, item=wire)
        if self.in_conversation:
            await self._send("conversation.item.added", previous_item_id=previous, item=wire)
        if item.type == "message":
            await self._send("response.content_part.added", **self._refs(output), content_index=0,
                             part={"type": "text", "text": ""})
        return output

    async def _save_progress(self) -> None:
        """Store the text of the open items as far as it came (the flusher calls this)."""
        for output in list(self._outputs):
            async with self._store_lock:
                num_pieces = len(output.pieces)
                if output.is_done or num_pieces == output.num_saved or self._storage_error is not None:
                    continue
                try:
                    await self._store_item(_snapshot(output, "in_progress"))
                except StorageUnavailable as exc:
                    self._stop_for_storage(exc)
                    return
                output.num_saved = num_pieces

    async def _store_end(self, output: _Output, status: ItemStatus) -> bool:
        """The item as it ended, stored (a store failure other than storage's is logged: the response goes
        on); False when storage failed: the response stops, and its end stores the item."""
        async with self._store_lock:
            ended = _snapshot(output, status)
            try:
                await self._store_item(ended)
            except StorageUnavailable as exc:
                self._stop_for_storage(exc)
                return False
            output.item, output.is_done = ended, True
            return True

    async def _store_item(self, item: Item) -> None:
        if not self.in_conversation:
            return
        try:
            await asyncio.to_thread(self.store.update_item, self.conversation_id, item)
        except StorageUnavailable:
            raise
        except AssistantError:
            log.info("response %s: its output item %s was deleted while it ran", self.id, item.id)
        except Exception:
            log.exception("response %s: could not store its output item %s", self.id, item.id)

    async def _send_done(self, output: _Output) -> None:
        item, refs = output.item, self._refs(output)
        if item.type == "message":
            await self._send("response.output_text.done", **refs, content_index=0, text=output.text)
            await self._send("response.content_part.done", **refs, content_index=0,
                             part={"type": "text", "text": output.text})
        else:
            await self._send("response.function_call_arguments.done", **refs, call_id=item.call_id,
                             name=item.name, arguments=output.text)
        wire = self.writer.item(item)
        await self._send("response.output_item.done", response_id=self.id, output_index=output.index, item=wire)
        if self.in_conversation:
            await self._send("conversation.item.done", previous_item_id=output.previous_item_id, item=wire)

    def _refs(self, output: _Output) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": output.item.id, "output_index": output.index}

    # ------------------------------------------------------------ the end

    async def _finish(self, finished: Finished) -> None:
        """Close what is open, store the outcome, then tell the client (who may have left). When storage fails
        on the way, the outcome becomes a failure (storage_unavailable) and its writes wait in ``pending``."""
        if not self._outputs and self._storage_error is None:  # neither text nor a call: an empty message
            try:
                await self._open_message()
            except StorageUnavailable as exc:
                self._storage_error = exc
            except Exception:
                log.exception("response %s: could not add its empty message", self.id)
        closing = [output for output in self._outputs if not output.is_done]
        finished = self._with_storage_error(finished)
        record = self._close(finished, closing)
        try:
            # The open items' last state and the outcome in one transaction: one write, one worker-thread hop.
            await asyncio.to_thread(self.store.finish_response, record, self._closing_items(closing))
        except StorageUnavailable as exc:
            self._storage_error = self._storage_error or exc
            finished = self._with_storage_error(finished)
            record = self._close(finished, closing)  # what the client is told, and what must land
            self.pending.add(f"response {self.id}", partial(self.store.finish_response, record,
                                                            self._closing_items(closing)))
        except Exception:
            log.exception("response %s: could not store the result", self.id)
        log_outcome(record, "response", self.conversation_id)
        status, details = status_of(finished, self._cancel_reason or "client_cancelled")
        try:
            for output in closing:
                await self._send_done(output)
            await self._send("response.done", response=self._response_json(status, details, usage_of(finished)))
        except Exception:
            # The connection is gone; the result is stored, which is what matters.
            log.info("response %s finished after the client left", self.id)

    def _closing_items(self, closing: list[_Output]) -> list[Item]:
        """What :meth:`Store.finish_response` writes of the items closed with the response."""
        return [output.item for output in closing] if self.in_conversation else []

    def _with_storage_error(self, finished: Finished) -> Finished:
        error = self._storage_error
        return finished if error is None else replace(finished, reason="error", code=error.code, error=error.message)

    def _close(self, finished: Finished, closing: list[_Output]) -> ResponseRecord:
        """The items still open take their final state from the outcome; returns the outcome as stored."""
        status, details = status_of(finished, self._cancel_reason or "client_cancelled")
        for output in closing:
            output.item = _snapshot(output, "completed" if status == "completed" else "incomplete")
            output.is_done = True
        first_token_ms = None if self._first_token_at is None else (self._first_token_at - self._started) * 1000.0
        return ResponseRecord(
            self.id, self.conversation_id, status, details.get("reason") if details else None,
            tuple(output.item.id for output in self._outputs) if self.in_conversation else (), usage_of(finished),
            first_token_ms, (time.monotonic() - self._started) * 1000.0)

    def _response_json(self, status: str, details: dict[str, Any] | None = None,
                       usage: Usage | None = None) -> dict[str, Any]:
        """The response object: in progress (no output yet), or done with its output items and usage."""
        output = [output.item for output in self._outputs] if status != "in_progress" else None
        return self.writer.response(
            self.id, self.conversation_id if self.in_conversation else None, status, output=output, usage=usage,
            status_details=details, metadata=self.metadata, max_output_tokens=self.max_output_tokens)

    async def _send(self, type_: str, **fields: Any) -> None:
        event = self.writer.event(type_, **fields)
        if event is not None:
            await self._send_event(event)


def log_outcome(record: ResponseRecord, kind: str, conversation_id: str | None) -> None:
    """One log line per response (or chat completion): ids, outcome, tokens, timing."""
    usage = record.usage
    first = "-" if record.time_to_first_token_ms is None else f"{record.time_to_first_token_ms:.0f} ms"
    log.info("%s %s (conversation %s): %s%s, %d input (%d cached) and %d output tokens, first token %s, %.0f ms",
             kind, record.id, conversation_id or "-", record.status, f" ({record.reason})" if record.reason else "",
             usage.input_tokens, usage.cached_tokens, usage.output_tokens, first, record.duration_ms or 0.0)


def _snapshot(output: _Output, status: ItemStatus) -> Item:
    """The output's item holding the text (or arguments) so far, with ``status``."""
    if output.item.type == "message":
        return replace(output.item, content=(ContentPart("output_text", text=output.text),), status=status)
    return replace(output.item, arguments=output.text, status=status)


def usage_of(finished: Finished) -> Usage:
    """The token accounting of a finished engine request."""
    return Usage(input_tokens=finished.num_prompt_tokens, output_tokens=finished.num_output_tokens,
                 cached_tokens=finished.num_cached_tokens, image_tokens=finished.num_image_tokens,
                 cached_image_tokens=finished.num_cached_image_tokens)


def status_of(finished: Finished,
              cancel_reason: CancelReason = "client_cancelled") -> tuple[str, dict[str, Any] | None]:
    """Map an engine finish reason to a Realtime response status and status_details; a cancelled request is
    ``cancelled`` when its client cancelled it, ``incomplete`` when the server's drain cut it."""
    match finished.reason:
        case "stop":
            return "completed", {"type": "completed", "reason": None}
        case "length":
            return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        case "cancelled" if cancel_reason == "server_shutdown":
            return "incomplete", {"type": "incomplete", "reason": "server_shutdown"}
        case "cancelled":
            return "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
    public = engine_error(finished.code, finished.error)
    if public is not None:
        error = {"type": public.type, "code": public.code, "message": public.message}
    else:
        error = {"type": "server_error", "code": MODEL_ERROR,
                 "message": "Generation failed; the conversation is intact."}
    return "failed", {"type": "failed", "reason": None, "error": error}
