"""One connection's state machine: client events in → store and engine calls → server events out.

A :class:`Session` never touches a socket: the server hands it frames through
:meth:`Session.handle` and gives it an async ``send`` callable. It never touches
a tensor either: it speaks to the engine through :class:`GenerationRequest` and
the event stream that ends in one ``Finished``.

Invariants:
- every client event is answered, and every failure becomes one ``error``
  event; the connection stays open and nothing stored is lost;
- at most one response runs per conversation; none starts once the server drains (:mod:`assistant.drain`);
- a response belongs to its conversation (:mod:`assistant.replay`), not to this connection: its events go to
  whichever connection is attached to it, and when this one closes the response runs on to its end (unless
  ``cancel_on_disconnect``, an extension, is set); a connection opened with ``last_event_id`` is first sent
  the events it missed;
- ``image.match`` (extension) stores nothing and is answered in order: the
  connection's next event is handled once its ``image.match.result`` (or error)
  is sent. It runs beside a response, not against the one-response rule; the
  engine does it in one step, so a ``response.cancel`` behind it waits that long;
- every item is stored before it is announced; a response's output items are
  stored as ``in_progress`` when they start and finalized when they end, also when
  the client disconnects mid-response (:mod:`assistant.response_run` runs a response);
- the tools and tool choice in effect are checked together: a ``session.update`` or
  ``response.create`` whose ``tool_choice`` names no tool in effect changes nothing;
- the conversation row is written with the connection's first item or response (for its tenant), so a
  connection that writes nothing stores nothing; before that, no item can be named;
- database and image work run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from assistant import images as image_codec
from assistant.drain import Drain
from assistant.engine.request import Finished, GenerationRequest, ImageChunk, InlineImages, ScoreRequest
from assistant.engine.sampling import SamplingParams
from assistant.errors import (AssistantError, BudgetExceeded, ImageRejected, InternalError, InvalidValue,
                              ItemNotFound, ReplayUnavailable, ResponseCancelNotActive, ResponseInProgress,
                              ResponseNotFound, engine_error, quote)
from assistant.events import EventWriter, SessionView, match_result_json, new_id
from assistant.intake import ImageBudget, conversation_budget, validate_item
from assistant.items import ContentPart, Item, StoredImage
from assistant.limits import TenantLimits
from assistant.prompts import StoreImages, build_messages
from assistant.protocol import (AudioBufferClear, ClientEvent, ImageInput, ImageMatch, ItemCreate, ItemDelete,
                                ItemInput, ItemRetrieve, ResponseCancel, ResponseCreate, SessionUpdate, SettingChanges,
                                parse_client_event)
from assistant.pending_writes import PendingWrites
from assistant.peers import Peers
from assistant.replay import LiveConversation, LiveConversations
from assistant.response_run import ResponseRun, Send
from assistant.store import Store
from assistant.store_models import DEFAULT_TENANT
from assistant.tools import (FunctionTool, ToolChoice, build_grammar, calls_allowed, parse_tool_choice,
                             template_tool_choice, template_tools, tools_prompt)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """A session's effective generation settings (defaults, then ``session.update``; a response's own on top)."""

    instructions: str
    sampling: SamplingParams
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice("auto"))

    def apply(self, changes: SettingChanges, prefix: str) -> Settings:
        """These settings with ``changes`` made; ``prefix`` ("session." or "response.") names their fields in
        errors. Raises a coded error, changing nothing, when the tool choice does not fit the tools."""
        instructions = self.instructions if changes.instructions is None else changes.instructions
        tools = self.tools if changes.tools is None else changes.tools
        if changes.tool_choice is not None:
            choice = parse_tool_choice(changes.tool_choice, tools, param=f"{prefix}tool_choice")
        else:
            choice = self.tool_choice
            names = {tool.name for tool in tools}
            if (choice.mode == "required" and not tools) or (choice.mode == "function" and choice.name not in names):
                wanted = "a tool" if choice.mode == "required" else f"the function '{choice.name}'"
                raise InvalidValue(f"'{prefix}tools' leaves out {wanted}, which the tool_choice in effect calls "
                                   "for; send a tool_choice with the tools.", param=f"{prefix}tools")
        return Settings(instructions, self.sampling.replace(**changes.sampling), tools, choice)

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return calls_allowed(self.tools, self.tool_choice)

    def system_prompt(self, *, template_renders_tools: bool) -> str:
        """The instructions, and the tools prompt when the model may call tools (unless its chat template
        describes them itself)."""
        tools_text = "" if template_renders_tools else tools_prompt(self.tools, self.tool_choice)
        return "\n\n".join(text for text in (self.instructions, tools_text) if text)


class Session:
    def __init__(
        self,
        *,
        store: Store,
        pending: PendingWrites,  # where a response's final writes wait when storage fails
        engine: Any,  # AsyncEngine: generate(request) -> AsyncIterator[EngineEvent], score(request), abort(request_id)
        conversation_id: str,
        model_name: str,
        settings: Settings,
        image_budget: ImageBudget,
        writer: EventWriter,
        send: Send,
        drain: Drain,  # refuses new responses once the server drains; counts this connection's response
        live: LiveConversations,  # the responses running (or just ended) by conversation, with their replay
        peers: Peers | None = None,  # the other replicas (PostgreSQL only): their responses, followed or cancelled
        renders_tools: bool = False,  # the model's chat template describes tools itself (ChatModel.renders_tools)
        tenant: str = DEFAULT_TENANT,
        is_conversation_stored: bool = True,  # False: stored with the first item or response, not before
        limits: TenantLimits | None = None,  # per-tenant bounds; None: unbounded
    ) -> None:
        self.store = store
        self.tenant = tenant
        self._is_conversation_stored = is_conversation_stored
        self._storing_conversation = asyncio.Lock()
        self.limits = limits
        self.drain = drain
        self.pending = pending
        self.renders_tools = renders_tools
        self.engine = engine
        self.conversation_id = conversation_id
        self.model_name = model_name
        self.settings = settings
        self.image_budget = image_budget
        self.writer = writer
        self.live = live
        self._socket_send = send
        self.id = new_id("sess")
        self.cancel_on_disconnect = False  # extension (session.update): a dropped connection cancels its response
        self._live: LiveConversation | None = None  # the conversation's live state this connection attached to
        self._last_event_id: str | None = None  # of the last event sent on this connection
        self._replay: asyncio.Task[None] | None = None  # sending a reconnecting client what it missed
        self.peers = peers
        self._following: str | None = None  # the token of a response followed on another replica (peers)

    # ------------------------------------------------------------ lifecycle

    async def start(self, last_event_id: str | None = None) -> None:
        """Say ``session.created``; with ``last_event_id`` (a reconnecting client's), then send every event of
        the conversation's response after it, and attach to the live ones (a coded error when it is not held).
        The replay runs beside the client's events, so a ``response.cancel`` need not wait for it to catch up."""
        await self.send("session.created", session=self.writer.session(self._session_view()))
        if last_event_id is not None:
            self._replay = asyncio.create_task(self._resume(last_event_id))

    async def _resume(self, last_event_id: str) -> None:
        live = self._live = self.live.get(self.conversation_id) if self._is_conversation_stored else None
        try:
            if live is None and await self._running_elsewhere() is not None:
                assert self.peers is not None
                self._following = await self.peers.follow(self.conversation_id, last_event_id, self._deliver,
                                                          self._send_error)
                log.info("connection %s follows conversation %s on another replica", self.id, self.conversation_id)
                return
            if live is None:
                raise ReplayUnavailable(f"No response of this conversation ran recently: nothing to replay after "
                                        f"'{quote(last_event_id)}'.", param="last_event_id")
            num_replayed = await live.attach(self, self._deliver, last_event_id, greeting_id=self._last_event_id)
            log.info("connection %s resumed conversation %s: %d events replayed", self.id, self.conversation_id,
                     num_replayed)
        except AssistantError as exc:  # replay_unavailable: the events from now on follow, if it still runs
            await self._send_error(exc)

    async def close(self) -> None:
        """The client is gone: its response runs on (or is cancelled, with ``cancel_on_disconnect``)."""
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()
            await asyncio.wait([self._replay])
        if self._following is not None and self.peers is not None:
            with contextlib.suppress(Exception):  # the database may be gone too; the relay then ends by itself
                await self.peers.unfollow(self._following)
                if self.cancel_on_disconnect:
                    await self.peers.cancel(self.conversation_id)
        live = self._live
        if live is not None and live.detach(self) and live.is_running and self.cancel_on_disconnect:
            assert live.cancel is not None
            live.cancel()

    async def _deliver(self, event: dict[str, Any]) -> None:
        """Every event this connection gets goes through here."""
        self._last_event_id = event["event_id"]
        await self._socket_send(event)

    async def _send(self, event: dict[str, Any]) -> None:
        """An event of the session's own (not a response's): noted in the replay, so a client may resume after it."""
        live = self._live
        if live is not None and live.is_attached(self):
            live.mark(event["event_id"])
        await self._deliver(event)

    async def _send_error(self, error: AssistantError) -> None:
        """One ``error`` event (a session event: noted in the replay like the others)."""
        await self._send(self.writer.error(error))

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
            await self._send_error(exc)
        except Exception:
            log.exception("internal error while handling a client event")
            error = InternalError()
            error.event_id = event_id
            await self._send_error(error)

    async def _dispatch(self, event: ClientEvent) -> None:
        match event:
            case SessionUpdate(changes=changes, refused=refused, cancel_on_disconnect=cancel_on_disconnect):
                self.settings = self.settings.apply(changes, "session.")
                if cancel_on_disconnect is not None:
                    self.cancel_on_disconnect = cancel_on_disconnect
                await self._send_refused(refused, event.event_id)
                await self.send("session.updated", session=self.writer.session(self._session_view()))
            case ItemCreate(item=item_input, previous_item_id=previous):
                await self._create_item(item_input, previous)
            case ItemDelete(item_id=item_id):
                self._check_conversation_has(item_id)
                await asyncio.to_thread(self.store.delete_item, self.conversation_id, item_id)
                await self.send("conversation.item.deleted", item_id=item_id)
            case ItemRetrieve(item_id=item_id):
                self._check_conversation_has(item_id)
                item = await asyncio.to_thread(self.store.get_item, self.conversation_id, item_id)
                urls = await asyncio.to_thread(self._image_urls, item)
                await self.send("conversation.item.retrieved", item=self.writer.item(item, urls.__getitem__))
            case ResponseCreate(refused=refused):
                if self._replay is not None:  # a new response's events must not overtake the replayed ones
                    await asyncio.wait([self._replay])
                self.drain.admit()
                self._check_no_response_running()
                await self._check_none_running_elsewhere()
                await self._send_refused(refused, event.event_id)
                self._start_response(event)
            case ResponseCancel(response_id=response_id):
                if not await self._cancel_elsewhere(response_id):
                    self._cancel_response(response_id)
            case AudioBufferClear():
                await self.send("input_audio_buffer.cleared")
            case ImageMatch():
                await self._match(event)

    async def _send_refused(self, refused: tuple[AssistantError, ...], event_id: str | None) -> None:
        """The parts of an event that were not applied: one coded error each (the rest was applied)."""
        for error in refused:
            error.event_id = event_id
            await self._send_error(error)

    def _session_view(self) -> SessionView:
        settings = self.settings
        return SessionView(self.id, self.model_name, self.conversation_id, settings.instructions, settings.sampling,
                           settings.tools, settings.tool_choice, self.cancel_on_disconnect)

    # ------------------------------------------------------------ items

    async def _store_conversation(self) -> None:
        """Store the conversation before its first write: a connection that writes nothing leaves no row. A
        response's task and the next client event may both get here first: one stores it."""
        async with self._storing_conversation:
            if not self._is_conversation_stored:
                await asyncio.to_thread(self.store.create_conversation, tenant=self.tenant,
                                        conversation_id=self.conversation_id)
                self._is_conversation_stored = True

    def _check_conversation_has(self, item_id: str) -> None:
        if not self._is_conversation_stored:  # nothing was written yet: no item can be named
            raise ItemNotFound(f"No item '{quote(item_id)}' in this conversation.", param="item_id")

    async def _create_item(self, item_input: ItemInput, previous_item_id: str | None) -> None:
        item, new_images = await asyncio.to_thread(self._validate_item, item_input, "item")
        image_parts = [p for p in item.content if p.is_image]
        check = self._conversation_budget(image_parts, "item") if image_parts else None
        await self._store_conversation()
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
                               image_source=source, scoring=event.scoring,
                               **({} if event.prompt is None else {"prompt": event.prompt}))
        finished = await self.engine.score(request)
        if finished.reason != "stop":
            raise _error_of(finished)
        await self.send("image.match.result", client_event_id=event.event_id, **match_result_json(event.scoring,
                                                                                                finished.scores))

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
        live = self.live.get(self.conversation_id)
        if live is None or not live.is_running:
            return
        if live.is_attached(self):
            raise ResponseInProgress(f"Response {live.response_id} is still in progress; wait for response.done "
                                     "or send response.cancel.")
        raise ResponseInProgress(f"Response {live.response_id} is still in progress in this conversation, for a "
                                 "connection that dropped or another one; reconnect with ?last_event_id= to follow "
                                 "it, or wait for it to end.")

    def _start_response(self, event: ResponseCreate) -> None:
        self._check_no_response_running()
        settings = self.settings.apply(event.changes, "response.")  # a coded error here starts nothing
        rate_limits = None
        if self.limits is not None:
            remaining = self.limits.acquire_response(self.tenant)
            if remaining is not None:  # the tenant has a bound of its own (keys are on)
                rate_limits = [{"name": "requests", "limit": self.limits.max_responses_per_tenant,
                                "remaining": remaining, "reset_seconds": 0.0}]
        live = self.live.open(self.conversation_id)
        run = ResponseRun(new_id("resp"), store=self.store, pending=self.pending, engine=self.engine,
                          writer=self.writer, send=live.publish, conversation_id=self.conversation_id,
                          in_conversation=event.use_conversation, calls_tools=settings.calls_tools,
                          metadata=event.metadata, max_output_tokens=settings.sampling.max_output_tokens,
                          rate_limits=rate_limits)
        # The response outlives this connection: counted (per tenant, by the drain) until its task ends.
        task = asyncio.create_task(self._respond(run, event, settings, live.publish))
        live.start(run.id, task, run.cancel)
        live.attach_now(self, self._deliver, self._last_event_id)
        self._live = live
        if self.limits is not None:
            limits, tenant = self.limits, self.tenant
            task.add_done_callback(lambda _: limits.release_response(tenant))
        self.drain.track(task, lambda: run.cancel("server_shutdown"))

    async def _running_elsewhere(self) -> str | None:
        """The response of this conversation another replica runs (None without peers, or when none does)."""
        if self.peers is None or not self._is_conversation_stored:
            return None
        return await asyncio.to_thread(self.store.running_elsewhere, self.conversation_id)

    async def _check_none_running_elsewhere(self) -> None:
        response_id = await self._running_elsewhere()
        if response_id is not None:
            raise ResponseInProgress(f"Response {response_id} is still in progress in this conversation on another "
                                     "replica; reconnect with ?last_event_id= to follow it, or wait for it to end.")

    async def _cancel_elsewhere(self, response_id: str | None) -> bool:
        """Ask the replica that runs this conversation's response to cancel it; False when none does."""
        live = self._live
        if live is not None and live.is_running:
            return False  # it runs here
        running = await self._running_elsewhere()
        if running is None or (response_id is not None and response_id != running):
            return False
        assert self.peers is not None
        await self.peers.cancel(self.conversation_id)
        return True

    def _cancel_response(self, response_id: str | None) -> None:
        live = self._live
        if live is None or not live.is_attached(self) or not live.is_running:
            raise ResponseCancelNotActive("There is no response in progress to cancel.")
        if response_id is not None and response_id != live.response_id:
            raise ResponseNotFound(f"The response in progress is not '{response_id}'.", param="response_id")
        assert live.cancel is not None
        live.cancel()

    async def _respond(self, run: ResponseRun, event: ResponseCreate, settings: Settings, publish: Send) -> None:
        try:
            await self._store_conversation()  # the response row names it, also when out of band
            request = await asyncio.to_thread(self._prepare_request, run.id, event, settings)
            await asyncio.to_thread(self.store.start_response, run.id, self.conversation_id)
        except Exception as exc:  # nothing was announced yet: one error event says it all
            if not isinstance(exc, AssistantError):
                log.exception("response %s could not start", run.id)
                exc = InternalError()
            exc.event_id = event.event_id
            await publish(self.writer.error(exc))  # to whichever connection follows the response by now
            return
        await run.run(request)

    def _prepare_request(self, response_id: str, event: ResponseCreate, settings: Settings) -> GenerationRequest:
        """Worker thread: gather the items the model sees; their images go by reference, and the engine fetches
        the bytes of those its embedding cache lacks through the request's image source (one store query).
        With tools, the system message lists them and a grammar holds the answer to text or valid calls."""
        inline: dict[str, bytes] = {}  # the images of response.input, which are not stored
        if event.input is not None:
            pairs = [self._validate_item(it, f"response.input[{i}]") for i, it in enumerate(event.input)]
            items = [item for item, _ in pairs]
            inline = {image.sha256: image.data for _, images in pairs for image in images}
        else:
            items = self.store.list_items(self.conversation_id) if event.use_conversation else []
        system_prompt = settings.system_prompt(template_renders_tools=self.renders_tools)
        tools = template_tools(settings.tools, settings.tool_choice) if self.renders_tools else ()
        return GenerationRequest(response_id, build_messages(system_prompt, items), settings.sampling, tools=tools,
                                 tool_choice=template_tool_choice(settings.tool_choice),
                                 image_source=StoreImages(self.store, inline),
                                 grammar=build_grammar(settings.tools, settings.tool_choice))


def _error_of(finished: Finished) -> AssistantError:
    """The error event for a request the engine did not complete (not a response: an image.match)."""
    error = engine_error(finished.code, finished.error) if finished.reason == "error" else None
    return error or InternalError("The request could not be completed inside the model; nothing was stored.")
