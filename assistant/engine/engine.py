"""The engine: requests in, token deltas out, on one dedicated thread.

API (nano-vllm's shape): :meth:`Engine.add_request`, :meth:`Engine.step`,
:meth:`Engine.abort`; :meth:`Engine.start` runs ``step()`` in a daemon thread
that sleeps on a condition while idle. :class:`AsyncEngine` bridges one request
to an async iterator for the session.

Contract:
- every request accepted by ``add_request`` gets exactly one terminal
  :class:`Finished` event through its sink, whatever happens: eos or a stop
  string ("stop"), ``max_output_tokens`` or a full context ("length"), abort
  ("cancelled"), or an exception in the model for that request ("error", with a
  log-safe message; the traceback goes to the log). One request failing never
  stops the thread or the other requests;
- ``abort`` takes effect at the start of the next step, so within one decode step;
- sinks are called from the engine thread, outside the engine lock; a sink that
  raises (its consumer is gone) gets its request dropped;
- ``Finished`` counts the prompt's tokens (image positions included), its image
  tokens, and how many of those came from the model's image-embedding cache
  (images already encoded for an earlier turn or another conversation);
- a :class:`~assistant.engine.request.ScoreRequest` (image–text matching) is
  admitted like a generation request and runs whole in the step that admits it
  (:func:`~assistant.engine.matching.score_answers`): no deltas, one ``Finished``
  with ``reason="stop"`` and its ``scores``; an abort that arrives before that
  step cancels it;
- the engine knows nothing about sockets or the store; the asyncio loop only
  ever waits on a queue, never on model work. Torch's thread settings are left
  as the process set them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from assistant.engine.detokenize import IncrementalDetokenizer
from assistant.engine.model import ChatModel, PromptError, PromptTooLong
from assistant.engine.matching import score_answers
from assistant.engine.request import (EngineEvent, Finished, FinishReason, GenerationRequest, MatchScore, Request,
                                      ScoreRequest, TokenDelta)
from assistant.engine.sampling import make_generator, sample
from assistant.engine.scheduler import EngineOverloaded, Scheduler
from assistant.engine.sequence import Sequence

__all__ = ["AsyncEngine", "Engine", "EngineOverloaded", "EngineStopped"]

log = logging.getLogger(__name__)

# Output room kept free when truncating a conversation, if the request sets no
# max_output_tokens; never more than a quarter of the context.
DEFAULT_OUTPUT_RESERVE = 512


class EngineStopped(RuntimeError):
    """``add_request`` after ``shutdown``."""


class Engine:
    def __init__(self, model: ChatModel, *, max_num_running: int = 4, max_num_waiting: int = 64) -> None:
        self.model = model
        self.scheduler = Scheduler(max_num_running=max_num_running, max_num_waiting=max_num_waiting)
        self._cond = threading.Condition()  # guards scheduler, _pending_aborts, _is_stopping
        self._pending_aborts: set[str] = set()
        self._is_stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ any thread

    def add_request(self, request: Request, sink: Callable[[EngineEvent], None]) -> None:
        """Queue a request; its events go to ``sink``. Raises EngineOverloaded when the queue is full."""
        with self._cond:
            if self._is_stopping:
                raise EngineStopped("the engine is shutting down")
            self.scheduler.add(Sequence(request, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Cancel a request at the next step; unknown or finished ids are ignored."""
        with self._cond:
            self._pending_aborts.add(request_id)
            self._cond.notify()

    def start(self) -> None:
        """Run ``step()`` on a daemon thread until :meth:`shutdown`."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="assistant-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Cancel every request (each gets its Finished) and stop the thread."""
        with self._cond:
            self._is_stopping = True
            self._pending_aborts.update(self.scheduler.all_request_ids())
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            while self.step():
                pass

    # ------------------------------------------------------------ engine thread

    def step(self) -> bool:
        """Apply aborts, prefill newly admitted sequences, decode one token for each running one.

        Returns whether work is left.
        """
        with self._cond:
            aborted = [self.scheduler.abort(request_id) for request_id in self._pending_aborts]
            self._pending_aborts.clear()
            batch = self.scheduler.schedule()
        for seq in aborted:
            if seq is not None:
                self._finish(seq, "cancelled")
        for seq in batch.prefill:
            self._guarded(self._score if seq.is_scoring else self._prefill, seq)
        # Round-robin, one sequence at a time for now; a batched decode takes batch.decode whole.
        for seq in batch.decode:
            if not seq.is_finished:
                self._guarded(self._decode, seq)
        with self._cond:
            return self.scheduler.has_work or bool(self._pending_aborts)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self.scheduler.has_work or self._pending_aborts or self._is_stopping):
                    self._cond.wait()
                if self._is_stopping and not (self.scheduler.has_work or self._pending_aborts):
                    return
            try:
                self.step()
            except Exception:  # a bug outside any one request: keep serving, don't spin hot
                log.exception("engine step failed")
                time.sleep(0.1)

    def _guarded(self, work: Callable[[Sequence], None], seq: Sequence) -> None:
        try:
            work(seq)
        except PromptTooLong as exc:
            self._finish(seq, "error", f"context_length_exceeded: {exc}")
        except PromptError as exc:
            self._finish(seq, "error", f"invalid_prompt: {exc}")
        except Exception:
            log.exception("request %s failed in the model", seq.request_id)
            self._finish(seq, "error", "model_error: generation failed inside the model; see the server log")

    def _prefill(self, seq: Sequence) -> None:
        model = self.model
        reserve = min(seq.params.max_output_tokens or DEFAULT_OUTPUT_RESERVE, model.max_context_tokens // 4)
        prompt = model.render(seq.request.messages, max(1, model.max_context_tokens - max(1, reserve)))
        if prompt.num_dropped_messages:
            log.info("request %s: dropped the %d oldest messages to fit the context",
                     seq.request_id, prompt.num_dropped_messages)
        seq.prompt_token_ids = prompt.token_ids
        seq.num_image_tokens = prompt.num_image_tokens
        seq.detokenizer = IncrementalDetokenizer(model.tokenizer, seq.prompt_token_ids)
        seq.generator = make_generator(seq.params.seed)
        image_embeds, seq.num_cached_image_tokens = model.encode_images(prompt.images)  # (num_image_tokens, C)
        logits, seq.kv_cache = model.prefill(prompt, image_embeds)  # (vocab,)
        self._append_token(seq, self._sample(seq, logits))

    def _score(self, seq: Sequence) -> None:
        request = seq.request
        assert isinstance(request, ScoreRequest)
        scores = score_answers(self.model, request.image, request.texts, request.prompt, request.instructions)
        self._finish(seq, "stop", scores=scores)

    def _decode(self, seq: Sequence) -> None:
        logits = self.model.decode(seq.last_token_id, seq.kv_cache, has_images=seq.num_image_tokens > 0)  # (vocab,)
        self._append_token(seq, self._sample(seq, logits))

    def _sample(self, seq: Sequence, logits: Any) -> int:
        return sample(logits, seq.params, seq.generator, prompt_token_ids=seq.prompt_token_ids,
                      output_token_ids=seq.output_token_ids, exempt_token_ids=self.model.eos_token_ids)

    def _append_token(self, seq: Sequence, token_id: int) -> None:
        """Record one sampled token, stream the text it completes, finish if it ends the sequence."""
        assert seq.detokenizer is not None
        seq.output_token_ids.append(token_id)
        seq.num_unreported_tokens += 1
        is_eos = token_id in self.model.eos_token_ids
        is_length = (seq.num_output_tokens == seq.params.max_output_tokens
                     or seq.num_tokens >= self.model.max_context_tokens)
        text = "" if is_eos else seq.detokenizer.push(token_id)
        if is_eos or is_length:
            text += seq.detokenizer.flush()  # an unfinished character comes out as U+FFFD
        text, is_stopped = seq.stop_checker.push(text)
        if not is_stopped and (is_eos or is_length):
            text += seq.stop_checker.flush()  # held text that never became a stop string
        if text:
            self._deliver(seq, TokenDelta(text=text, num_tokens=seq.num_unreported_tokens))
            seq.num_unreported_tokens = 0
        if is_stopped or is_eos:
            self._finish(seq, "stop")
        elif is_length:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                scores: tuple[MatchScore, ...] = ()) -> None:
        """Send the one Finished event and release the sequence (idempotent)."""
        if seq.finish_reason is not None:
            return
        with self._cond:
            self.scheduler.finish(seq)
        seq.finish_reason = reason
        seq.kv_cache = None
        self._deliver(seq, Finished(reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
                                    num_output_tokens=seq.num_output_tokens,
                                    num_image_tokens=seq.num_image_tokens,
                                    num_cached_image_tokens=seq.num_cached_image_tokens, error=error,
                                    scores=scores))

    def _deliver(self, seq: Sequence, event: EngineEvent) -> None:
        try:
            seq.sink(event)
        except Exception:
            log.warning("request %s: its consumer is gone; dropping it", seq.request_id, exc_info=True)
            if not isinstance(event, Finished):
                seq.sink = _discard
                self._finish(seq, "cancelled")


def _discard(event: EngineEvent) -> None:
    pass


class AsyncEngine:
    """The engine seen from asyncio: one async iterator of events per request."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream the request's events, ending with its Finished; closing early aborts it.

        Raises EngineOverloaded (before any event) when the engine's queue is full.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def sink(event: EngineEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        self.engine.add_request(request, sink)
        is_finished = False
        try:
            while not is_finished:
                event = await queue.get()
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

        self.engine.add_request(request, sink)
        try:
            return await asyncio.shield(finished)
        finally:
            if not finished.done():  # the awaiting task was cancelled
                self.engine.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)


def _resolve(future: asyncio.Future[Finished], event: Finished) -> None:
    if not future.done():
        future.set_result(event)
