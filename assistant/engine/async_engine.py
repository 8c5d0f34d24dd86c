"""The engine seen from asyncio: admission on a worker thread, one async iterator of events per request.

The session and the HTTP API use it; the event loop only ever waits on a queue,
never on model work (:mod:`assistant.engine.engine` has the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from assistant.engine.request import EngineEvent, Finished, GenerationRequest, Request, ScoreRequest, TokenDelta

if TYPE_CHECKING:
    from assistant.engine.engine import Engine


class AsyncEngine:
    """The engine seen from asyncio: one async iterator of events per request.

    Admission (rendering and tokenizing a whole conversation) runs on one worker
    thread of its own, in arrival order: never on the event loop, never on the
    engine thread, so a long prompt stalls neither the connections nor the streams.

    A stream's text deltas come at most every ``stream_interval_s`` (0: each as soon as it is made): the first at
    once, then what was made during the interval as one delta; the end comes at once, with the text before it.
    Why: each delta is a protocol event, a socket write and a wake-up of the client, and on two cores that work
    is taken from the engine (README, "Streaming"), while no reader sees text arrive faster than every 20 ms or so.
    """

    def __init__(self, engine: Engine, *, stream_interval_s: float = 0.0) -> None:
        if stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        self.engine = engine
        self.stream_interval_s = stream_interval_s
        self._admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="assistant-admission")

    async def _add(self, request: Request, sink: Callable[[EngineEvent], None]) -> None:
        """Admit ``request`` on the admission thread; returns once it is queued (or refused)."""
        added = asyncio.get_running_loop().run_in_executor(self._admission, self.engine.add_request, request, sink)
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:  # the awaiting task is gone: abort the request once it is in the engine
            added.add_done_callback(lambda _: self.engine.abort(request.request_id))
            raise

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream the request's events, ending with its Finished; closing early aborts it. Text deltas come at
        most every ``stream_interval_s`` (the class docstring); text that is already waiting when the consumer
        comes for more is handed over as one delta (:func:`_merge_waiting`).

        Raises EngineOverloaded (before any event) when the engine's queue is full.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        ending = asyncio.Event()  # the Finished is queued: the text before it goes without waiting

        def receive(event: EngineEvent) -> None:  # on the loop
            queue.put_nowait(event)
            if isinstance(event, Finished):
                ending.set()

        def sink(event: EngineEvent) -> None:  # on the engine thread
            loop.call_soon_threadsafe(receive, event)

        await self._add(request, sink)
        is_finished = False
        held: EngineEvent | None = None  # taken from the queue while merging, yielded next
        next_delta_at = 0.0  # loop time before which text waits for the rest of the interval
        try:
            while not is_finished:
                event = held if held is not None else await queue.get()
                held = None
                if isinstance(event, TokenDelta):
                    delay = next_delta_at - loop.time()
                    if delay > 0 and not ending.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ending.wait(), delay)
                    event, held = _merge_waiting(event, queue)
                    next_delta_at = loop.time() + self.stream_interval_s
                is_finished = isinstance(event, Finished)
                yield event
        finally:
            if not is_finished:  # the consumer stopped early (aclose, break, task cancelled)
                self.engine.abort(request.request_id)

    async def score(self, request: ScoreRequest) -> Finished:
        """Run a score request; return its one Finished (``scores`` set when ``reason == "stop"``).

        Raises EngineOverloaded when the engine's queue is full; cancelling the
        awaiting task aborts the request.
        """
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[Finished] = loop.create_future()

        def sink(event: EngineEvent) -> None:
            if isinstance(event, Finished):
                loop.call_soon_threadsafe(_resolve, finished, event)

        await self._add(request, sink)
        try:
            return await asyncio.shield(finished)
        finally:
            if not finished.done():  # the awaiting task was cancelled
                self.engine.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    @property
    def is_running(self) -> bool:
        return self.engine.is_running

    def shutdown(self) -> None:
        """Stop admitting (admissions under way finish), then shut the engine down."""
        self._admission.shutdown(wait=True)
        self.engine.shutdown()


def _merge_waiting(delta: TokenDelta, queue: asyncio.Queue[EngineEvent]) -> tuple[TokenDelta, EngineEvent | None]:
    """``delta`` with the text deltas queued right behind it, and the first other event taken (or None).

    When the event loop falls behind the engine (many streams on few cores), each token would otherwise cost
    one protocol event (encoding, compressing and writing it); a consumer that keeps up still gets one delta a
    token, as soon as it is made: nothing waits for company."""
    text, tokens = [delta.text], delta.num_tokens
    following: EngineEvent | None = None
    while not queue.empty():
        following = queue.get_nowait()
        if not isinstance(following, TokenDelta):
            break
        text.append(following.text)
        tokens += following.num_tokens
        following = None
    merged = delta if tokens == delta.num_tokens else TokenDelta("".join(text), tokens)
    return merged, following


def _resolve(future: asyncio.Future[Finished], event: Finished) -> None:
    if not future.done():
        future.set_result(event)
