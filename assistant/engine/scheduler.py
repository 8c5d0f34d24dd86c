"""Which sequences run this step: a waiting queue, a running list, and their bounds.

Pure bookkeeping, no torch: tested with bare :class:`Sequence` objects.

Policy:
- at most ``max_num_running`` sequences hold a KV cache at once; the rest wait
  in arrival order, at most ``max_num_waiting`` of them beyond the free running
  slots — :meth:`Scheduler.add` raises :class:`EngineOverloaded` past that;
- each step decodes every sequence that was already running (the engine does
  that in one forward pass per decode batch) and admits (prefills) at most
  ``max_num_prefill`` waiting sequences, so a long prompt arriving delays the
  others by one prefill, never more; and none whose KV cache would not fit the
  engine's memory budget (``fits``, which also sees the ones admitted before it in the same step), unless
  nothing runs;
- a preempted sequence (:meth:`Scheduler.preempt`: the engine is over its KV memory
  budget) goes back to the front of the queue, to resume before newer arrivals;
- the caller (the engine) holds the lock around every call here.

"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from assistant.engine.sequence import Sequence, SequenceStatus
from assistant.errors import AssistantError


class EngineOverloaded(AssistantError):
    """Too many requests are queued; the client should retry later."""

    code = "server_overloaded"
    type = "server_error"


@dataclass
class SchedulerOutput:
    prefill: list[Sequence] = field(default_factory=list)  # newly admitted: run the prompt, sample one token
    decode: list[Sequence] = field(default_factory=list)  # already running: feed the last token, sample one


class Scheduler:
    def __init__(self, max_num_running: int = 4, max_num_waiting: int = 64, max_num_prefill: int = 1) -> None:
        if max_num_running < 1 or max_num_waiting < 0 or max_num_prefill < 1:
            raise ValueError("need max_num_running >= 1, max_num_waiting >= 0, max_num_prefill >= 1")
        self.max_num_running = max_num_running
        self.max_num_waiting = max_num_waiting
        self.max_num_prefill = max_num_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises EngineOverloaded when the queue is full."""
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        if len(self.waiting) + len(self.running) >= self.max_num_running + self.max_num_waiting:
            raise EngineOverloaded(f"The server is busy ({len(self.running)} responses running, "
                                   f"{len(self.waiting)} queued); retry shortly.")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def schedule(self, fits: Callable[[Sequence, list[Sequence]], bool] = lambda seq, admitted: True
                 ) -> SchedulerOutput:
        """Admit waiting sequences into free running slots (while ``fits(seq, admitted)`` says the next one may
        join the running ones and those admitted before it in this call, or nothing runs); decode the ones already
        running."""
        output = SchedulerOutput(decode=list(self.running))
        while (self.waiting and len(self.running) < self.max_num_running
               and len(output.prefill) < self.max_num_prefill
               and (not self.running or fits(self.waiting[0], output.prefill))):
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            output.prefill.append(seq)
        return output

    def preempt(self, seq: Sequence) -> None:
        """A running sequence gives its place up; it waits first in line to resume."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues for good (idempotent)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if self._by_id.get(seq.request_id) is seq:
            del self._by_id[seq.request_id]

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the sequence with this id from whichever queue holds it; None if unknown."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq)
        return seq

    def all_request_ids(self) -> list[str]:
        return list(self._by_id)
