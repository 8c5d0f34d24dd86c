"""The engine: requests in, token deltas out, on one dedicated thread.

API (nano-vllm's shape): :meth:`Engine.add_request`, :meth:`Engine.step`,
:meth:`Engine.abort`; :meth:`Engine.start` runs ``step()`` in a daemon thread
that sleeps on a condition while idle. :class:`~assistant.engine.async_engine.AsyncEngine`
bridges one request to an async iterator for the session.

Contract:
- admission happens in ``add_request``, on the caller's thread (the session calls
  it from a worker, :class:`AsyncEngine` from its one admission thread): a
  generation request's messages are rendered with the chat template, tokenized,
  truncated to the context less the output reserve, and refused there when even
  the latest message does not fit; its grammar, if any, is compiled there too
  (:mod:`~assistant.engine.constraint`; one the library cannot compile is refused
  with ``unsupported_schema``). The engine thread receives token ids and image
  references and does only model work: image encoding on cache misses (fetching
  the bytes of the misses through the request's image source, in one call),
  prefill, decode and sampling (masked by the request's grammar, if any);
- every request accepted by ``add_request`` gets exactly one terminal
  :class:`Finished` event through its sink, whatever happens: eos, a stop
  string or a complete grammar ("stop"), ``max_output_tokens`` or a full
  context ("length"), abort ("cancelled"), or a refusal or an exception in the
  model for that request ("error", with ``code`` from :mod:`assistant.errors` and
  a log-safe message; a traceback goes to the log). One request failing never
  stops the thread or the other requests;
- continuous batching: each step decodes one token for every running sequence in
  one forward pass per :class:`~assistant.engine.batch.DecodeBatch` (one for
  sequences with images, one without), then runs one chunk of
  ``prefill_chunk_tokens`` prompt positions of the oldest admitted sequence still
  prefilling (an image slot is never split), so running streams wait at most one
  chunk a step. Where that chunk ends the prompt, the next prompts' rests go into
  the same forward pass as long as they fit the chunk's positions, padding
  counted, and hold no image to place (:meth:`ChatModel.prefill_batch`): a burst
  of new conversations starts in one step, not one a step. Every free slot may be
  admitted in a step, but at most one prompt with an image to encode (the image
  cache does not hold it: its encoding takes the step's time) or score request.
  A sequence whose prompt is in joins the batch for the next step, and a finished
  or cancelled one leaves it at once. Sampling stays per row, with each request's
  own settings and seed.
  If a batched pass fails, its rows are retried alone, so a failure stays with the
  sequence that causes it;
- the KV memory budget (``max_kv_bytes``, the running sequences' caches, a decode
  batch's padding included): a waiting sequence is admitted only if its cache will
  fit, and over the budget the newest running sequences are preempted (cache
  dropped, back to the front of the queue) until the rest fit; a preempted one
  resumes later by prefilling its prompt and its answer so far, with its sampling
  state kept, so its output is what it would have been. One sequence always runs;
- ``abort`` takes effect at the start of the next step, so within one decode step;
- sinks are called from the engine thread, outside the engine lock; a sink that
  raises (its consumer is gone) gets its request dropped;
- KV reuse across turns: a finished sequence's KV cache (prompt and answer) goes
  to a :class:`~assistant.engine.prefix_cache.PrefixCache` bounded by
  ``kv_cache_bytes``; a later prompt that starts the same way (the next turn of the
  conversation) takes it and prefills only what follows the shared prefix (where
  that is one position, the same prompt again, the decode step feeds it);
- ``Finished`` counts the prompt's tokens (image positions included), its image
  tokens, the tokens of a reused KV prefix (``num_cached_tokens``), and the image
  tokens that were not encoded again: inside that prefix or from the model's
  image-embedding cache (images already encoded for an earlier turn or another
  conversation);
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

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from assistant.engine import int4_kernel
from assistant.engine.batch import DecodeBatch
from assistant.engine.constraint import GrammarCompiler, UnsupportedGrammar
from assistant.engine.detokenize import IncrementalDetokenizer
from assistant.engine.model import ChatModel, ImageGone, Prompt, PromptError, PromptTooLong
from assistant.engine.matching import score_answers
from assistant.engine.prefix_cache import PrefixCache, cache_bytes, continues_image, prompt_key
from assistant.engine.request import (EngineEvent, Finished, FinishReason, GenerationRequest, MatchScore, Request,
                                      ScoreRequest, TokenDelta)
from assistant.engine.sampling import make_generator, sample
from assistant.engine.scheduler import EngineOverloaded, Scheduler
from assistant.engine.sequence import Sequence
from assistant.errors import MODEL_ERROR, UNSUPPORTED_SCHEMA

__all__ = ["Engine", "EngineOverloaded", "EngineStopped"]

log = logging.getLogger(__name__)

# Output room kept free when truncating a conversation, if the request sets no
# max_output_tokens; never more than a quarter of the context.
DEFAULT_OUTPUT_RESERVE = 512


class EngineStopped(RuntimeError):
    """``add_request`` after ``shutdown``."""


class Engine:
    def __init__(self, model: ChatModel, *, max_num_running: int = 8, max_num_waiting: int = 64,
                 kv_cache_bytes: int = 0, prefill_chunk_tokens: int = 512, max_kv_bytes: int = 0,
                 on_image_encode: Callable[[float], None] | None = None) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.model = model
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_kv_bytes = max_kv_bytes  # the running sequences' KV caches; 0: no bound but the context
        self.on_image_encode = on_image_encode  # seconds spent encoding a prompt's images (engine thread)
        self._kv_bytes_per_position: float | None = None  # learned from the first prefilled cache
        self._prefilling: list[Sequence] = []  # admitted, prompt not run whole yet; the first gets a chunk a step
        self.prefix_cache = PrefixCache(kv_cache_bytes, model.new_cache)  # engine thread only
        # The running sequences, decoded one forward pass per batch and step; with and without images apart, since
        # the model's image adapter is switched per forward pass.
        self._batches = (DecodeBatch(model, has_images=False), DecodeBatch(model, has_images=True))
        # Every free slot may be taken in one step: admitting is cheap (an image's encoding or a score request
        # aside, which _fits keeps to one a step), and prompts admitted together are prefilled together.
        self.scheduler = Scheduler(max_num_running=max_num_running, max_num_waiting=max_num_waiting,
                                   max_num_prefill=max_num_running)
        self._renderer = model.for_rendering()  # admission's own tokenizer: never used on the engine thread
        self._grammars = GrammarCompiler(self._renderer.tokenizer, model.eos_token_ids)  # admission only
        self._admission_lock = threading.Lock()  # one admission at a time renders with it
        self._cond = threading.Condition()  # guards scheduler, _pending_aborts, _is_stopping
        self._pending_aborts: set[str] = set()
        self._is_stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ any thread

    def add_request(self, request: Request, sink: Callable[[EngineEvent], None]) -> None:
        """Admit a request (see the module docstring) and queue it; its events go to ``sink``.

        A prompt that cannot run (too long, refused by the chat template) is finished
        at once: ``sink`` gets its ``Finished(reason="error")`` before this returns.
        Raises EngineOverloaded when the queue is full, EngineStopped after ``shutdown``.
        """
        with self._cond:
            if self._is_stopping:
                raise EngineStopped("the engine is shutting down")
        seq = Sequence(request, sink)
        if isinstance(request, GenerationRequest):
            try:
                with self._admission_lock:
                    seq.prompt = self._admit(request)
                    seq.constraint = self._grammars.compile(request.grammar) if request.grammar else None
            except PromptError as exc:
                seq.finish_reason = "error"
                sink(Finished(reason="error", code=_code_of(exc), error=str(exc)))
                return
        with self._cond:
            if self._is_stopping:
                raise EngineStopped("the engine is shutting down")
            self.scheduler.add(seq)
            self._cond.notify()

    def _admit(self, request: GenerationRequest) -> Prompt:
        """Render and truncate the messages, keeping room for the answer (caller's thread)."""
        context = self._renderer.max_context_tokens
        reserve = min(request.params.max_output_tokens or DEFAULT_OUTPUT_RESERVE, context // 4)
        prompt = self._renderer.render(request.messages, max(1, context - max(1, reserve)), tools=request.tools)
        if prompt.num_dropped_messages:
            log.info("request %s: dropped the %d oldest messages to fit the context",
                     request.request_id, prompt.num_dropped_messages)
        return prompt

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

    @classmethod
    def start_loaded(cls, load: Callable[[], ChatModel], **options: Any) -> Engine:
        """Load the model on a new daemon thread and run the engine there; return once it runs (or raise what
        loading raised).

        Why one thread for both: torch's OpenMP runs each thread's parallel regions with a team of its own, and
        on a 2-core machine decoding on another thread than the one that loaded the model went about half as
        fast (11 against 21-29 tok/s for SmolLM2-135M int8-cpu: ``bench.concurrency``, README).
        """
        started: queue.Queue[Engine | BaseException] = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                engine = cls(load(), **options)
            except BaseException as exc:  # handed to the caller, who raises it
                started.put(exc)
                return
            engine._thread = threading.current_thread()
            started.put(engine)
            engine._run()

        threading.Thread(target=run, name="assistant-engine", daemon=True).start()
        result = started.get()
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def is_running(self) -> bool:
        """Whether the engine thread is alive and not stopping (the model is loaded: it loads before it runs)."""
        return self._thread is not None and self._thread.is_alive() and not self._is_stopping

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
        """Apply aborts, decode one token for every running sequence (one forward pass per batch), start newly
        admitted sequences, and run one prefill chunk of the oldest still prefilling (it joins the batch once its
        prompt is in).

        Returns whether work is left.
        """
        with self._cond:
            aborted = [self.scheduler.abort(request_id) for request_id in self._pending_aborts]
            self._pending_aborts.clear()
        for seq in aborted:
            if seq is not None:
                self._finish(seq, "cancelled")
        self._preempt_over_budget()
        with self._cond:
            batch = self.scheduler.schedule(fits=self._fits)
        for group in self._batches:
            if len(group):
                self._decode(group)
        for seq in batch.prefill:
            start = self._score if seq.is_scoring else self._resume if seq.output_token_ids else self._start
            self._guarded(start, seq)
        if self._prefilling:  # one chunk a step: running streams wait for at most one chunk
            self._prefill_step()
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
        except PromptError as exc:
            self._finish(seq, "error", str(exc), code=_code_of(exc))
        except Exception:
            log.exception("request %s failed in the model", seq.request_id)
            self._finish(seq, "error", "generation failed inside the model; see the server log", code=MODEL_ERROR)

    def _start(self, seq: Sequence) -> None:
        """A newly admitted sequence: take a reused KV prefix, encode the images after it; the rest of its prompt
        is then prefilled chunk by chunk (:meth:`_prefill_step`), or, where that rest is one position, fed by the
        decode step."""
        model, prompt, request = self.model, seq.prompt, seq.request
        assert prompt is not None and isinstance(request, GenerationRequest), "admitted generation requests only"
        seq.prompt_token_ids = prompt.token_ids
        seq.prompt_key = prompt_key(prompt)
        seq.num_image_tokens = prompt.num_image_tokens
        seq.detokenizer = IncrementalDetokenizer(model.tokenizer, seq.prompt_token_ids)
        seq.generator = make_generator(seq.params.seed)
        num_cached_after = self._queue_prefill(seq, prompt, seq.prompt_key)
        num_images_before = sum(not isinstance(key, int) for key in seq.prompt_key[:seq.num_prefilled])
        seq.num_cached_image_tokens = num_images_before + num_cached_after
        seq.num_cached_tokens = seq.num_prefilled + num_cached_after
        if seq.kv_cache is not None and len(seq.prefill_key) - seq.num_prefilled == 1 and isinstance(
                seq.prefill_key[-1], int):
            # The reused KV cache holds all but the last position (this prompt ran before: a retried response,
            # the same question in another conversation): the next decode step feeds that one beside the running
            # rows (Sequence.last_token_id), and samples the first token, instead of a forward pass of its own.
            self._prefilling.remove(seq)
            seq.image_embeds = None
            seq.num_prefilled = len(seq.prefill_key)
            self._join(seq)

    def _resume(self, seq: Sequence) -> None:
        """A preempted sequence: its prompt and its answer so far (all but the last token, which is fed by the
        next decode step) are prefilled again, after any reused prefix. Its sampling state was kept."""
        assert seq.prompt is not None
        answer = tuple(seq.output_token_ids[:-1])
        self._queue_prefill(seq, replace(seq.prompt, segments=(*seq.prompt.segments, answer)),
                            seq.prompt_key + answer)

    def _queue_prefill(self, seq: Sequence, prompt: Prompt, key: tuple[Any, ...]) -> int:
        """Take a reused KV prefix of ``key``, encode the images after it, and queue ``prompt`` for prefilling
        (:meth:`_prefill_chunk`); returns the image tokens whose embeddings came from the embedding cache."""
        request = seq.request
        assert isinstance(request, GenerationRequest)
        seq.prefill_prompt, seq.prefill_key = prompt, key
        seq.kv_cache, seq.num_prefilled = self.prefix_cache.take(key, _has_images(seq))
        started = time.perf_counter()
        seq.image_embeds, num_cached = self.model.encode_images(
            prompt.images_from(seq.num_prefilled), request.image_source)  # (image tokens after the reused prefix, C)
        if self.on_image_encode is not None and seq.image_embeds is not None and num_cached < len(seq.image_embeds):
            self.on_image_encode(time.perf_counter() - started)  # something was encoded, not only looked up
        self._prefilling.append(seq)
        return num_cached

    def _prefill_step(self) -> None:
        """This step's prefill: the next chunk of the oldest sequence still prefilling (:meth:`_prefill_chunk`),
        or, where its prompt ends in this chunk without an image to place, that and the whole rest of the next
        ones' prompts in one forward pass (:meth:`_prefill_together`), as many as fit the chunk's budget of
        ``prefill_chunk_tokens`` positions (padding counted): prompts admitted together (a burst of new
        conversations) start together instead of one a step."""
        first = self._prefilling[0]
        together = [first]
        if self._fits_together(first):
            for seq in self._prefilling[1:]:
                width = max(self._left_to_prefill(s) for s in (*together, seq))
                if (self._fits_together(seq) and _has_images(seq) == _has_images(first)
                        and (len(together) + 1) * width <= self.prefill_chunk_tokens):
                    together.append(seq)
        if len(together) == 1:
            self._guarded(self._prefill_chunk, first)
            return
        try:
            self._prefill_together(together)
        except Exception:
            log.exception("a prefill of %d prompts together failed; running them one by one", len(together))
            for seq in together:
                if seq in self._prefilling:
                    self._guarded(self._prefill_chunk, seq)

    def _left_to_prefill(self, seq: Sequence) -> int:
        return len(seq.prefill_key) - seq.num_prefilled

    def _fits_together(self, seq: Sequence) -> bool:
        """Whether the rest of ``seq``'s prompt can be prefilled beside others': it fits one chunk and holds no
        image position (those take embeddings, which one forward pass of several prompts does not place)."""
        left = self._left_to_prefill(seq)
        return (0 < left <= self.prefill_chunk_tokens
                and all(isinstance(position, int) for position in seq.prefill_key[seq.num_prefilled:]))

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        """The rest of each of ``seqs``' prompts in one forward pass (:meth:`ChatModel.prefill_batch`)."""
        prompts = [seq.prefill_prompt for seq in seqs]
        assert all(prompt is not None for prompt in prompts)
        chunks = [(prompt, seq.num_prefilled, len(seq.prefill_key), seq.kv_cache)
                  for seq, prompt in zip(seqs, prompts, strict=True)]
        logits, caches = self.model.prefill_batch(chunks, has_images=_has_images(seqs[0]))  # (B, vocab)
        if self._kv_bytes_per_position is None:
            self._kv_bytes_per_position = cache_bytes(caches[0]) / len(seqs[0].prefill_key)
        for row, (seq, cache) in enumerate(zip(seqs, caches, strict=True)):
            seq.kv_cache, seq.num_prefilled = cache, len(seq.prefill_key)
            self._guarded(lambda s, row=row: self._prefilled(s, logits[row]), seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        """Run the next ``prefill_chunk_tokens`` positions of the prompt (an image slot is never split); after the
        last chunk, sample the first token (unless resuming: it has it) and join the decode batch."""
        key, start = seq.prefill_key, seq.num_prefilled
        end = min(len(key), start + self.prefill_chunk_tokens)
        while continues_image(key, end):
            end += 1
        num_image_rows = sum(not isinstance(k, int) for k in key[start:end])
        # seq.image_embeds holds the rows of the images not prefilled yet, in order: this chunk takes the first.
        image_embeds, seq.image_embeds = seq.image_embeds[:num_image_rows], seq.image_embeds[num_image_rows:]
        assert seq.prefill_prompt is not None
        logits, seq.kv_cache = self.model.prefill(seq.prefill_prompt, image_embeds, cache=seq.kv_cache, start=start,
                                                  end=end)  # (vocab,)
        seq.num_prefilled = end
        if self._kv_bytes_per_position is None:
            self._kv_bytes_per_position = cache_bytes(seq.kv_cache) / end
        if end == len(key):
            self._prefilled(seq, logits)

    def _prefilled(self, seq: Sequence, logits: Any) -> None:
        """The prompt is in (``logits`` ``(vocab,)``: its last position's): sample the first token (unless
        resuming: it has it) and join the decode batch."""
        self._prefilling.remove(seq)
        seq.image_embeds = None
        if not seq.output_token_ids:
            self._append_token(seq, self._sample(seq, logits))
        if seq.finish_reason is None:
            self._join(seq)

    # ------------------------------------------------------------ the KV memory budget

    def _kv_bytes(self) -> int:
        """Bytes of the running sequences' KV caches (a decode batch's padding included)."""
        in_batches = sum(group.num_bytes() for group in self._batches)
        return in_batches + sum(cache_bytes(seq.kv_cache) for seq in self._prefilling if seq.kv_cache is not None)

    def _fits(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """The scheduler's ``fits``: whether a waiting sequence may join the running ones and those ``admitted``
        before it in this step. Its KV cache (its whole prompt and answer so far) must fit the memory budget once
        they all join their decode batches (which pad every row to the longest); and if its start takes a step's
        time (an image to encode, a score request), it must be the step's first that does: running streams wait
        for at most one such start a step, as for one prefill chunk."""
        if self._starts_heavy(seq) and any(self._starts_heavy(other) for other in admitted):
            return False
        if not self.max_kv_bytes or self._kv_bytes_per_position is None:
            return True
        total = self._kv_bytes()
        for group in self._batches:
            joining = [s for s in (*admitted, seq) if s.prompt is not None
                       and (s.prompt.num_image_tokens > 0) == group.has_images]
            if joining:
                width = max(group.width, *(len(s.prompt.token_ids) + len(s.output_token_ids) for s in joining))
                total += (len(group) + len(joining)) * width * self._kv_bytes_per_position - group.num_bytes()
        return total <= self.max_kv_bytes

    def _starts_heavy(self, seq: Sequence) -> bool:
        """Whether starting ``seq`` may take a step's time: a score request runs whole as it starts, and a prompt
        with an image not in the model's image cache encodes it (unless a reused KV prefix holds it, which is
        known only once it starts)."""
        return seq.is_scoring or (seq.prompt is not None and not self.model.has_embeddings(seq.prompt.images))

    def _preempt_over_budget(self) -> None:
        """Over ``max_kv_bytes``, preempt the newest running sequences until the rest fit; one always runs."""
        while self.max_kv_bytes and self._kv_bytes() > self.max_kv_bytes:
            with self._cond:
                holding = [seq for seq in self.scheduler.running
                           if seq.batch is not None or seq in self._prefilling]
            if len(holding) <= 1:
                return
            self._preempt(max(holding, key=lambda seq: seq.arrived_at))

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's KV cache and put it back in line; it resumes where it was (:meth:`_resume`)."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.batch is not None:
            seq.batch.remove(seq, keep_cache=False)
            seq.batch = None
        seq.kv_cache, seq.image_embeds = None, None
        with self._cond:
            self.scheduler.preempt(seq)
        log.info("request %s preempted (KV over %d bytes) after %d output tokens; it resumes when there is room",
                 seq.request_id, self.max_kv_bytes, seq.num_output_tokens)

    def _join(self, seq: Sequence) -> None:
        """Hand the sequence's cache to its decode batch."""
        seq.batch = self._batches[_has_images(seq)]
        seq.batch.add(seq, seq.kv_cache)
        seq.kv_cache = None

    def _score(self, seq: Sequence) -> None:
        request = seq.request
        assert isinstance(request, ScoreRequest)
        scores = score_answers(self.model, request.image, request.texts, request.prompt, request.instructions,
                               source=request.image_source, scoring=request.scoring)
        self._finish(seq, "stop", scores=scores)

    def _decode(self, group: DecodeBatch) -> None:
        """One token for every row of ``group``, in one forward pass; if that pass fails, each row is retried
        alone, so one sequence that fails inside the model fails alone."""
        rows = list(group.rows)
        try:
            logits = group.step([seq.last_token_id for seq in rows])  # (B, vocab)
        except Exception:
            log.exception("a batched decode of %d sequences failed; retrying them one by one", len(rows))
            group.repair()
            for seq in rows:
                seq.kv_cache, seq.batch = group.remove(seq), None
                self._guarded(self._decode_alone, seq)
            return
        # Greedy rows that nothing steers (no penalty, no grammar) take one argmax for the batch, not one each.
        plain = [seq.params.is_greedy and not seq.params.has_penalties and seq.constraint is None for seq in rows]
        picks = int4_kernel.argmax(logits).tolist() if sum(plain) > 1 else None  # (B,)
        for row, seq in enumerate(rows):
            if picks is not None and plain[row]:
                self._guarded(lambda s, token_id=picks[row]: self._append_token(s, token_id), seq)
            else:
                self._guarded(lambda s, row=row: self._append_token(s, self._sample(s, logits[row])), seq)

    def _decode_alone(self, seq: Sequence) -> None:
        logits = self.model.decode(seq.last_token_id, seq.kv_cache, has_images=_has_images(seq))  # (vocab,)
        self._append_token(seq, self._sample(seq, logits))
        if seq.finish_reason is None:
            self._join(seq)

    def _sample(self, seq: Sequence, logits: Any) -> int:
        if seq.constraint is not None:
            logits = seq.constraint.mask_logits(logits)  # (vocab,): the grammar's forbidden tokens at -inf
        token_id = sample(logits, seq.params, seq.generator, prompt_token_ids=seq.prompt_token_ids,
                          output_token_ids=seq.output_token_ids, exempt_token_ids=self.model.eos_token_ids)
        if seq.constraint is not None:
            seq.constraint.advance(token_id)
        return token_id

    def _append_token(self, seq: Sequence, token_id: int) -> None:
        """Record one sampled token, stream the text it completes, finish if it ends the sequence."""
        assert seq.detokenizer is not None
        seq.output_token_ids.append(token_id)
        seq.num_unreported_tokens += 1
        is_eos = token_id in self.model.eos_token_ids
        is_complete = seq.constraint is not None and seq.constraint.is_finished  # nothing may follow this token
        is_length = (seq.num_output_tokens == seq.params.max_output_tokens
                     or seq.num_tokens >= self.model.max_context_tokens)
        text = "" if is_eos else seq.detokenizer.push(token_id)
        if is_eos or is_complete or is_length:
            text += seq.detokenizer.flush()  # an unfinished character comes out as U+FFFD
        text, is_stopped = seq.stop_checker.push(text)
        if not is_stopped and (is_eos or is_complete or is_length):
            text += seq.stop_checker.flush()  # held text that never became a stop string
        if text:
            # A model may emit U+0000 (random test models often do); no answer means it, and PostgreSQL's text
            # cannot store it: the client and the store both get U+FFFD instead.
            text = text.replace("\x00", "\ufffd")
            self._deliver(seq, TokenDelta(text=text, num_tokens=seq.num_unreported_tokens))
            seq.num_unreported_tokens = 0
        if is_stopped or is_eos or is_complete:
            self._finish(seq, "stop")
        elif is_length:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                scores: tuple[MatchScore, ...] = (), code: str | None = None) -> None:
        """Send the one Finished event and release the sequence (idempotent)."""
        if seq.finish_reason is not None:
            return
        with self._cond:
            self.scheduler.finish(seq)
        seq.finish_reason = reason
        if seq in self._prefilling:
            self._prefilling.remove(seq)
            seq.image_embeds = None
        if seq.batch is not None:
            seq.kv_cache = seq.batch.remove(seq, keep_cache=reason != "error")
            seq.batch = None
        if seq.kv_cache is not None and reason != "error":
            # The cache holds the prompt and every output token but the last, which was sampled, never fed.
            key = seq.prompt_key + tuple(seq.output_token_ids[:-1])
            if seq.kv_cache.get_seq_length() == len(key):
                self.prefix_cache.put(key, _has_images(seq), seq.kv_cache)
        seq.kv_cache = None
        self._deliver(seq, Finished(reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
                                    num_output_tokens=seq.num_output_tokens,
                                    num_image_tokens=seq.num_image_tokens,
                                    num_cached_image_tokens=seq.num_cached_image_tokens,
                                    num_cached_tokens=seq.num_cached_tokens, error=error, code=code, scores=scores))

    def _deliver(self, seq: Sequence, event: EngineEvent) -> None:
        try:
            seq.sink(event)
        except Exception:
            log.warning("request %s: its consumer is gone; dropping it", seq.request_id, exc_info=True)
            if not isinstance(event, Finished):
                seq.sink = _discard
                self._finish(seq, "cancelled")


def _has_images(seq: Sequence) -> bool:
    """Whether the sequence's prompt holds an image: its decode batch, and its forward passes' image adapter."""
    return seq.num_image_tokens > 0


def _discard(event: EngineEvent) -> None:
    pass


def _code_of(exc: PromptError) -> str:
    if isinstance(exc, UnsupportedGrammar):
        return UNSUPPORTED_SCHEMA
    if isinstance(exc, PromptTooLong):
        return "context_length_exceeded"
    return "image_not_found" if isinstance(exc, ImageGone) else "invalid_prompt"
