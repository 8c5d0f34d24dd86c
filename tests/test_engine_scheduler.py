"""Scheduler: admission, bounds, round-robin decode lists, abort — pure, no model."""

from __future__ import annotations

import pytest

from assistant.engine.request import EngineEvent, GenerationRequest
from assistant.engine.scheduler import EngineOverloaded, Scheduler
from assistant.engine.sequence import Sequence, SequenceStatus
from assistant.errors import AssistantError


def seq(request_id: str) -> Sequence:
    def sink(event: EngineEvent) -> None:
        pass

    return Sequence(GenerationRequest(request_id, ()), sink)


def test_admits_one_prefill_per_step_and_decodes_the_running() -> None:
    scheduler = Scheduler(max_num_running=2, max_num_waiting=4)
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        scheduler.add(s)
    first = scheduler.schedule()
    assert first.prefill == [a] and first.decode == []
    second = scheduler.schedule()
    assert second.prefill == [b] and second.decode == [a]
    third = scheduler.schedule()
    assert third.prefill == [] and third.decode == [a, b]  # c waits for a free slot
    assert c.status is SequenceStatus.WAITING and a.status is SequenceStatus.RUNNING
    scheduler.finish(a)
    fourth = scheduler.schedule()
    assert fourth.prefill == [c] and fourth.decode == [b]
    assert a.is_finished


def test_overload_past_running_plus_waiting() -> None:
    scheduler = Scheduler(max_num_running=1, max_num_waiting=2)
    for name in "abc":
        scheduler.add(seq(name))
    with pytest.raises(EngineOverloaded) as error:
        scheduler.add(seq("d"))
    assert isinstance(error.value, AssistantError) and error.value.code == "server_overloaded"
    scheduler.schedule()
    scheduler.finish(scheduler.running[0])
    scheduler.add(seq("d"))  # room again


def test_abort_removes_from_either_queue() -> None:
    scheduler = Scheduler(max_num_running=1, max_num_waiting=4)
    a, b = seq("a"), seq("b")
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    assert scheduler.abort("b") is b and b.is_finished and scheduler.num_waiting == 0
    assert scheduler.abort("a") is a and scheduler.num_running == 0
    assert scheduler.abort("a") is None and scheduler.abort("nope") is None
    assert not scheduler.has_work


def test_duplicate_request_id_is_refused() -> None:
    scheduler = Scheduler()
    scheduler.add(seq("a"))
    with pytest.raises(ValueError):
        scheduler.add(seq("a"))


def test_sequence_counts() -> None:
    s = seq("a")
    s.prompt_token_ids = [1, 2, 3]
    s.output_token_ids = [4, 5]
    assert (s.num_prompt_tokens, s.num_output_tokens, s.num_tokens, s.last_token_id) == (3, 2, 5, 5)


def test_a_preempted_sequence_waits_first_in_line_and_admission_asks_whether_it_fits() -> None:
    scheduler = Scheduler(max_num_running=3, max_num_waiting=4)
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        scheduler.add(s)
    scheduler.schedule()
    scheduler.schedule()
    scheduler.preempt(b)
    assert b.status is SequenceStatus.WAITING and list(scheduler.waiting) == [b, c]
    assert scheduler.schedule(fits=lambda s, admitted: False).prefill == []  # it does not fit while a runs
    assert scheduler.schedule(fits=lambda s, admitted: s is b).prefill == [b]  # first in line when it does
    scheduler.finish(a)
    scheduler.finish(b)
    assert scheduler.schedule(fits=lambda s, admitted: False).prefill == [c]  # nothing runs: one always may


def test_admission_sees_the_ones_admitted_before_in_the_same_step() -> None:
    scheduler = Scheduler(max_num_running=4, max_num_waiting=4, max_num_prefill=4)
    a, b, c, d = seq("a"), seq("b"), seq("c"), seq("d")
    for s in (a, b, c, d):
        scheduler.add(s)
    asked: list[tuple[str, list[str]]] = []

    def two_at_most(s: Sequence, admitted: list[Sequence]) -> bool:
        asked.append((s.request_id, [other.request_id for other in admitted]))
        return len(admitted) < 2

    assert scheduler.schedule(fits=two_at_most).prefill == [a, b]  # the first runs unasked: nothing ran
    assert asked == [("b", ["a"]), ("c", ["a", "b"])]
    prompt_one = seq("e")
    prompt_one.prompt_token_ids = [7, 8]
    assert prompt_one.last_token_id == 8  # before its first token, the decode step feeds the prompt's last
