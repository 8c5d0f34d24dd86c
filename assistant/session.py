"""One connection's state machine: client events in → store and engine calls → server events out.

A :class:`Session` never touches a socket: the server hands it frames through
:meth:`Session.handle` and gives it an async ``send`` callable. It never touches
a tensor either: it speaks to the engine through :class:`GenerationRequest` and
the event stream that ends in one ``Finished``.

Invariants:
- every client event is answered, and every failure becomes one ``error``
  event; the connection stays open and nothing stored is lost;
- at most one response runs per connection;
- ``image.match`` (extension) stores nothing and is answered in order: the
  connection's next event is handled once its ``image.match.result`` (or error)
  is sent. It runs beside a response, not against the one-response rule; the
  engine does it in one step, so a ``response.cancel`` behind it waits that long;
- every item is stored before it is announced; a response's output item is
  stored as ``in_progress`` when it starts and finalized when it ends, also when
  the client disconnects mid-response;
- database and image work run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from assistant import images as image_codec
from assistant.engine.request import (Finished, GenerationRequest, ImageChunk, InlineImages, ScoreRequest,
                                      TokenDelta)
from assistant.engine.sampling import SamplingParams
from assistant.errors import (MODEL_ERROR, AssistantError, BudgetExceeded, ImageRejected, InternalError,
                              ResponseCancelNotActive, ResponseInProgress, ResponseNotFound, engine_error)
from assistant.events import EventWriter, SessionView, match_result_json, new_id
from assistant.intake import ImageBudget, conversation_budget, validate_item
from assistant.items import ContentPart, Item, ResponseRecord, StoredImage, Usage
from assistant.prompts import StoreImages, build_messages
from assistant.protocol import (AudioBufferClear, ClientEvent, ImageInput, ImageMatch, ItemCreate, ItemDelete,
                                ItemInput, ItemRetrieve, ResponseCancel, ResponseCreate, SamplingChanges, SessionUpdate,
                                parse_client_event)
from assistant.store import Store

log = logging.getLogger(__name__)
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Settings:
    """A session's effective generation settings (defaults, then ``session.update``)."""

    instructions: str
    sampling: SamplingParams

    def apply(self, changes: SamplingChanges) -> Settings:
        instructions = self.instructions if changes.instructions is None else changes.instructions
        return Settings(instructions, self.sampling.replace(**changes.sampling))


class Session:
    def __init__(
        self,
        *,
        store: Store,
        engine: Any,  # AsyncEngine: generate(request) -> AsyncIterator[EngineEvent], score(request), abort(request_id)
        conversation_id: str,
        model_name: str,
        settings: Settings,
        image_budget: ImageBudget,
        writer: EventWriter,
        send: Send,
    ) -> None:
        self.store = store
        self.engine = engine
        self.conversation_id = conversation_id
        self.model_name = model_name
        self.settings = settings
        self.image_budget = image_budget
        self.writer = writer
        self._send = send
        self.id = new_id("sess")
        self._response_task: asyncio.Task[None] | None = None
        self._response_id: str | None = None
        # Set by a cancel or a disconnect that may come before the engine knows the request.
        self._is_cancel_requested = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.send("session.created", session=self.writer.session(self._session_view()))

    async def close(self) -> None:
        """The client is gone: stop generating, and let the response record itself."""
        task = self._response_task
        if task is not None and not task.done():
            self._is_cancel_requested = True
            self.engine.abort(self._response_id)
            await asyncio.wait([task])

    async def send(self, type_: str, **fields: Any) -> None:
        event = self.writer.event(type_, **fields)
        if event is not None:
            await self._send(event)

    # ------------------------------------------------------------ dispatch

    async def handle(self, frame: str | bytes) -> None:
        """Handle one client frame; failures become one ``error`` event."""
        event_id = None
        try:
            event = parse_client_event(frame)
            event_id = event.event_id
            await self._dispatch(event)
        except AssistantError as exc:
            exc.event_id = exc.event_id or event_id
            await self._send(self.writer.error(exc))
        except Exception:
            log.exception("internal error while handling a client event")
            error = InternalError()
            error.event_id = event_id
            await self._send(self.writer.error(error))

    async def _dispatch(self, event: ClientEvent) -> None:
        match event:
            case SessionUpdate(changes=changes, refused=refused):
                self.settings = self.settings.apply(changes)
                await self._send_refused(refused, event.event_id)
                await self.send("session.updated", session=self.writer.session(self._session_view()))
            case ItemCreate(item=item_input, previous_item_id=previous):
                await self._create_item(item_input, previous)
            case ItemDelete(item_id=item_id):
                await asyncio.to_thread(self.store.delete_item, self.conversation_id, item_id)
                await self.send("conversation.item.deleted", item_id=item_id)
            case ItemRetrieve(item_id=item_id):
                item = await asyncio.to_thread(self.store.get_item, self.conversation_id, item_id)
                urls = await asyncio.to_thread(self._image_urls, item)
                await self.send("conversation.item.retrieved", item=self.writer.item(item, urls.__getitem__))
            case ResponseCreate(refused=refused):
                self._check_no_response_running()
                await self._send_refused(refused, event.event_id)
                self._start_response(event)
            case ResponseCancel(response_id=response_id):
                self._cancel_response(response_id)
            case AudioBufferClear():
                await self.send("input_audio_buffer.cleared")
            case ImageMatch():
                await self._match(event)

    async def _send_refused(self, refused: tuple[AssistantError, ...], event_id: str | None) -> None:
        """The parts of an event that were not applied: one coded error each (the rest was applied)."""
        for error in refused:
            error.event_id = event_id
            await self._send(self.writer.error(error))

    def _session_view(self) -> SessionView:
        return SessionView(self.id, self.model_name, self.conversation_id, self.settings.instructions,
                           self.settings.sampling)

    # ------------------------------------------------------------ items

    async def _create_item(self, item_input: ItemInput, previous_item_id: str | None) -> None:
        item, new_images = await asyncio.to_thread(self._validate_item, item_input, "item")
        image_parts = [p for p in item.content if p.is_image]
        check = self._conversation_budget(image_parts, "item") if image_parts else None
        previous = await asyncio.to_thread(self.store.add_item, self.conversation_id, item, previous_item_id,
                                           new_images, check)
        wire = self.writer.item(item)
        await self.send("conversation.item.added", previous_item_id=previous, item=wire)
        await self.send("conversation.item.done", previous_item_id=previous, item=wire)

    def _validate_item(self, item_input: ItemInput, param: str) -> tuple[Item, list[StoredImage]]:
        return validate_item(item_input, self.image_budget, param)

    def _conversation_budget(self, image_parts: list[ContentPart], param: str) -> Callable[[list[ContentPart]], None]:
        return conversation_budget(self.image_budget, image_parts, param)

    def _image_urls(self, item: Item) -> dict[str, str]:
        images = self.store.get_images(item.image_hashes)
        return {sha256: image_codec.to_data_url(image) for sha256, image in images.items()}

    # ------------------------------------------------------------ image matching

    async def _match(self, event: ImageMatch) -> None:
        """Score the texts against the image (the session's instructions as the system message); store nothing."""
        if self.image_budget.tokens_per_image is None:
            raise ImageRejected("This model does not accept images; image.match needs a vision model.",
                                param="image", code="image_input_not_supported")
        image, source = await asyncio.to_thread(self._validate_match_image, event.image)
        request = ScoreRequest(new_id("match"), image, event.texts, instructions=self.settings.instructions,
                               image_source=source, **({} if event.prompt is None else {"prompt": event.prompt}))
        finished = await self.engine.score(request)
        if finished.reason != "stop":
            raise _error_of(finished)
        await self.send("image.match.result", client_event_id=event.event_id, **match_result_json(finished.scores))

    def _validate_match_image(self, image: ImageInput) -> tuple[ImageChunk, InlineImages]:
        """Worker thread: the checks an item's image gets, and its per-message token budget."""
        budget = self.image_budget
        assert budget.tokens_per_image is not None
        _, data = image_codec.parse_image_url(image.image_url, budget.limits, param="image.image_url")
        stored, _ = image_codec.load_image(data, budget.limits, param="image.image_url")
        num_tokens = budget.tokens_per_image(image.detail)
        if num_tokens > budget.max_tokens_per_message:
            raise BudgetExceeded(f"This image needs {num_tokens} image tokens; a message may use at most "
                                 f"{budget.max_tokens_per_message}. Use detail \"low\".", param="image.detail",
                                 code="too_many_image_tokens")
        chunk = ImageChunk(stored.sha256, image.detail)  # type: ignore[arg-type]
        return chunk, InlineImages({stored.sha256: stored.data})

    # ------------------------------------------------------------ responses

    def _check_no_response_running(self) -> None:
        if self._response_task is not None and not self._response_task.done():
            raise ResponseInProgress(f"Response {self._response_id} is still in progress; wait for response.done "
                                     "or send response.cancel.")

    def _start_response(self, event: ResponseCreate) -> None:
        self._check_no_response_running()
        self._response_id = new_id("resp")
        self._is_cancel_requested = False
        self._response_task = asyncio.create_task(self._run_response(self._response_id, event))

    def _cancel_response(self, response_id: str | None) -> None:
        running = self._response_task is not None and not self._response_task.done()
        if not running:
            raise ResponseCancelNotActive("There is no response in progress to cancel.")
        if response_id is not None and response_id != self._response_id:
            raise ResponseNotFound(f"The response in progress is not '{response_id}'.", param="response_id")
        self._is_cancel_requested = True
        self.engine.abort(self._response_id)

    def _prepare_prompt(self, event: ResponseCreate, settings: Settings) -> GenerationRequest:
        """Worker thread: gather the items the model sees; their images go by reference, and the engine fetches
        the bytes of those its embedding cache lacks through the request's image source (one store query)."""
        inline: dict[str, bytes] = {}  # the images of response.input, which are not stored
        if event.input is not None:
            pairs = [self._validate_item(it, f"response.input[{i}]") for i, it in enumerate(event.input)]
            items = [item for item, _ in pairs]
            inline = {image.sha256: image.data for _, images in pairs for image in images}
        else:
            items = self.store.list_items(self.conversation_id) if event.use_conversation else []
        return GenerationRequest("", build_messages(settings.instructions, items), settings.sampling,
                                 image_source=StoreImages(self.store, inline))

    async def _run_response(self, response_id: str, event: ResponseCreate) -> None:
        started = time.monotonic()
        settings = self.settings.apply(event.changes)
        in_conversation = event.use_conversation
        item = Item(new_id("item"), "assistant", (), status="in_progress")
        try:
            request = await asyncio.to_thread(self._prepare_prompt, event, settings)
            await asyncio.to_thread(self.store.start_response, response_id, self.conversation_id)
        except Exception as exc:  # nothing was announced yet: one error event says it all
            if not isinstance(exc, AssistantError):
                log.exception("response %s could not start", response_id)
                exc = InternalError()
            exc.event_id = event.event_id
            await self._send(self.writer.error(exc))
            return
        request = replace(request, request_id=response_id)
        refs = {"response_id": response_id, "item_id": item.id, "output_index": 0}
        previous: str | None = None
        text: list[str] = []
        first_token_at: float | None = None
        finished = Finished(reason="error", error="engine stream ended without a terminal event")
        try:
            if in_conversation:
                previous = await asyncio.to_thread(self.store.add_item, self.conversation_id, item)
            response = self.writer.response(response_id, self.conversation_id if in_conversation else None,
                                            "in_progress", metadata=event.metadata,
                                            max_output_tokens=settings.sampling.max_output_tokens)
            await self.send("response.created", response=response)
            await self.send("response.output_item.added", response_id=response_id, output_index=0,
                            item=self.writer.item(item))
            if in_conversation:
                await self.send("conversation.item.added", previous_item_id=previous, item=self.writer.item(item))
            await self.send("response.content_part.added", **refs, content_index=0,
                            part={"type": "text", "text": ""})
            if self._is_cancel_requested:  # cancelled before the engine saw the request
                finished = Finished(reason="cancelled")
            else:
                async for engine_event in self.engine.generate(request):
                    if isinstance(engine_event, TokenDelta):
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                        if engine_event.text:
                            text.append(engine_event.text)
                            await self.send("response.output_text.delta", **refs, content_index=0,
                                            delta=engine_event.text)
                    else:
                        finished = engine_event
        except AssistantError as exc:  # the engine refused the request (queue full)
            finished = Finished(reason="error", code=exc.code, error=exc.message)
        except Exception:
            log.exception("response %s failed", response_id)
            self.engine.abort(response_id)
            finished = Finished(reason="error", error="internal error")
        finally:
            await asyncio.shield(self._finish_response(
                response_id, item, "".join(text), finished, in_conversation, previous, refs, event,
                settings, started, first_token_at))

    async def _finish_response(
        self, response_id: str, item: Item, text: str, finished: Finished, in_conversation: bool,
        previous: str | None, refs: dict[str, Any], event: ResponseCreate, settings: Settings,
        started: float, first_token_at: float | None,
    ) -> None:
        status, details = _status_of(finished)
        item = replace(item, content=(ContentPart("output_text", text=text),),
                       status="completed" if status == "completed" else "incomplete")
        usage = Usage(input_tokens=finished.num_prompt_tokens, output_tokens=finished.num_output_tokens,
                      cached_tokens=finished.num_cached_tokens, image_tokens=finished.num_image_tokens,
                      cached_image_tokens=finished.num_cached_image_tokens)
        now = time.monotonic()
        record = ResponseRecord(
            response_id, self.conversation_id, status, details.get("reason") if details else None,
            (item.id,) if in_conversation else (), usage,
            None if first_token_at is None else (first_token_at - started) * 1000.0, (now - started) * 1000.0)
        if in_conversation:
            try:
                await asyncio.to_thread(self.store.update_item, self.conversation_id, item)
            except AssistantError:
                log.info("response %s: its output item was deleted while it ran", response_id)
            except Exception:
                log.exception("response %s: could not store its output item", response_id)
        try:
            await asyncio.to_thread(self.store.finish_response, record)
        except Exception:
            log.exception("response %s: could not store the result", response_id)
        part = {"type": "text", "text": text}
        wire_item = self.writer.item(item)
        try:
            await self.send("response.output_text.done", **refs, content_index=0, text=text)
            await self.send("response.content_part.done", **refs, content_index=0, part=part)
            await self.send("response.output_item.done", response_id=response_id, output_index=0, item=wire_item)
            if in_conversation:
                await self.send("conversation.item.done", previous_item_id=previous, item=wire_item)
            response = self.writer.response(
                response_id, self.conversation_id if in_conversation else None, status, output=[item], usage=usage,
                status_details=details, metadata=event.metadata, max_output_tokens=settings.sampling.max_output_tokens)
            await self.send("response.done", response=response)
        except Exception:
            # The connection is gone; the result is stored, which is what matters.
            log.info("response %s finished after the client left", response_id)


def _public_error(finished: Finished) -> AssistantError | None:
    """The engine's error as a client may see it: its code and message, unless the model itself failed (then
    the server log has the details and the client a generic message)."""
    return engine_error(finished.code, finished.error)


def _error_of(finished: Finished) -> AssistantError:
    """The error event for a request the engine did not complete (not a response: an image.match)."""
    error = _public_error(finished) if finished.reason == "error" else None
    return error or InternalError("The request could not be completed inside the model; nothing was stored.")


def _status_of(finished: Finished) -> tuple[str, dict[str, Any] | None]:
    """Map an engine finish reason to a Realtime response status and status_details."""
    match finished.reason:
        case "stop":
            return "completed", {"type": "completed", "reason": None}
        case "length":
            return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        case "cancelled":
            return "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
    public = _public_error(finished)
    if public is not None:
        error = {"type": public.type, "code": public.code, "message": public.message}
    else:
        error = {"type": "server_error", "code": MODEL_ERROR,
                 "message": "Generation failed; the conversation is intact."}
    return "failed", {"type": "failed", "reason": None, "error": error}
