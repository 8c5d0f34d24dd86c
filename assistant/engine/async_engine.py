"""The engine seen from asyncio: admission on a worker thread, one async iterator of events per request.

The session and the HTTP API use it; the event loop only ever waits on a queue,
never on model work (:mod:`assistant.engine.engine` has the contract).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from assistant.engine.request import EngineEvent, Finished, GenerationRequest, Request, ScoreRequest, TokenDelta

if TYPE_CHECKING:
    from assistant.engine.engine import Engine


_TIMER_SLACK_S = 0.001  # an interval's end this close counts as reached: not worth another timer


class AsyncEngine:
    """The engine seen from asyncio: one async iterator of events per request.

    Admission (rendering and tokenizing a whole conversation) runs on one worker
    thread of its own, in arrival order: never on the event loop, never on the
    engine thread, so a long prompt stalls neither the connections nor the streams.

    A stream's text deltas come at most once a tick of ``stream_interval_s`` (0: each as soon as it is made): the
    first at once, then at each tick of a grid that all streams share, what was made since as one delta; the end
    comes at once, with the text before it.
    Why: each delta is a protocol event, a socket write, a wake-up of the event loop and one of the client, and on
    two cores that work is taken from the engine (README, "Streaming"), while text that comes twenty times a
    second reads as smoothly as text that comes with every token.
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
        most once a tick of ``stream_interval_s`` (the class docstring); text that is already waiting when the consumer
        comes for more is handed over as one delta (:func:`_merge_waiting`).

        The engine thread wakes the event loop only when this stream waits for an event, or for the end: while the
        stream waits out its interval (on a timer of the loop's), the tokens it gets wake nobody, and what came
        meanwhile is picked up when the interval ends; so a delta costs the loop one wake-up, not two (a wake-up a
        token cost the engine about 2 % of a single stream's tokens/s, measured in-process).

        Raises EngineOverloaded (before any event) when the engine's queue is full.
        """
        loop = asyncio.get_running_loop()
        arrived: deque[EngineEvent] = deque()  # appended on the engine thread, taken here
        wake = asyncio.Event()
        is_waiting = False  # this stream waits for its next event (read on the engine thread)

        def sink(event: EngineEvent) -> None:  # on the engine thread
            arrived.append(event)
            if is_waiting or isinstance(event, Finished):
                loop.call_soon_threadsafe(wake.set)

        def is_ending() -> bool:
            return bool(arrived) and isinstance(arrived[-1], Finished)  # nothing follows a Finished

        await self._add(request, sink)
        is_finished = False
        next_delta_at = 0.0  # loop time before which text waits for the rest of the interval
        try:
            while not is_finished:
                # Wait out the interval; the end cuts it short. A wake-up meant for an earlier wait (still in
                # the loop's queue when that wait ended) only makes this one look again.
                while next_delta_at - loop.time() > _TIMER_SLACK_S and not is_ending():
                    wake.clear()
                    if is_ending():  # the end came between the two looks: its wake-up may be the one cleared
                        break
                    timer = loop.call_later(next_delta_at - loop.time(), wake.set)
                    try:
                        await wake.wait()
                    finally:
                        timer.cancel()
                if not arrived:
                    # The flag first, then the deque: the engine thread appends first, then reads the flag, so
                    # one of the two sees the other (under the GIL) and no event waits unannounced.
                    is_waiting = True
                    while not arrived:
                        await wake.wait()
                        wake.clear()
                    is_waiting = False
                event = arrived.popleft()
                if isinstance(event, TokenDelta):
                    event = _merge_waiting(event, arrived)
                    next_delta_at = self._next_tick(loop.time())
                is_finished = isinstance(event, Finished)
                yield event
        finally:
            if not is_finished:  # the consumer stopped early (aclose, break, task cancelled)
                self.engine.abort(request.request_id)

    def _next_tick(self, now: float) -> float:
        """The first tick of the interval's grid after ``now`` (``now`` with no interval): every stream's intervals
        end together, so the loop sends the deltas of all running streams in one go, one wake-up for all (their
        code and data still in cache from the first), and each client's deltas come a tick apart."""
        interval = self.stream_interval_s
        return (math.floor(now / interval) + 1) * interval if interval else now

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


def _merge_waiting(delta: TokenDelta, arrived: deque[EngineEvent]) -> TokenDelta:
    """``delta`` with the text deltas waiting right behind it in ``arrived`` (taken from it).

    When the event loop falls behind the engine (many streams on few cores), each token would otherwise cost
    one protocol event (encoding, compressing and writing it); a consumer that keeps up, with no interval, still
    gets one delta a token, as soon as it is made."""
    text, tokens = [delta.text], delta.num_tokens
    while arrived and isinstance(arrived[0], TokenDelta):
        following = arrived.popleft()
        assert isinstance(following, TokenDelta)
        text.append(following.text)
        tokens += following.num_tokens
    return delta if tokens == delta.num_tokens else TokenDelta("".join(text), tokens)


def _resolve(future: asyncio.Future[Finished], event: Finished) -> None:
    if not future.done():
        future.set_result(event)
