"""Continuous batching: sequences join and leave one decode batch, and each gets exactly its solo output."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from assistant.engine import engine as engine_module
from assistant.engine.batch import DecodeBatch
from assistant.engine.engine import Engine
from assistant.engine.int4_cpu import Int4Linear
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from assistant.engine.prefix_cache import cache_bytes, copy_positions
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk, TokenDelta
from assistant.engine.sampling import SamplingParams
from tests.engine_fixtures import save_tiny_chat_model, user
from tests.vision_fixtures import IMAGES, image_chunk, load_tiny_llava_chat, make_image

PROMPTS = ["What is the capital of France?", "Hello", "Emoji 🙂 and 🚀 are fun! Tell me a long story about them.",
           "The user asks a question."]


@pytest.fixture(scope="module", params=["none", "int8-cpu", "int4-cpu"])
def model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ChatModel:
    """The tiny model in float32, as it is and with --quantize int8-cpu and int4-cpu: all keep these equalities."""
    return load_chat_model(str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))), dtype="float32",
                           quantize=request.param)


def request(request_id: str, messages: tuple[ChatMessage, ...], tokens: int, **params: Any) -> GenerationRequest:
    return GenerationRequest(request_id, messages, SamplingParams(**{"temperature": 0.0, **params},
                                                                  max_output_tokens=tokens), image_source=IMAGES)


def solo(model: ChatModel, req: GenerationRequest) -> tuple[str, Finished]:
    return run_alone(Engine(model, max_num_running=1), req)


def run_alone(engine: Engine, req: GenerationRequest) -> tuple[str, Finished]:
    """``req`` through ``engine`` until it is idle: its text and its Finished."""
    events: list[EngineEvent] = []
    engine.add_request(req, events.append)
    while engine.step():
        pass
    assert isinstance(events[-1], Finished)
    return text(events), events[-1]


def text(events: list[EngineEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def staggered(engine: Engine, requests: list[GenerationRequest], arrivals: list[int]) -> dict[str, list[EngineEvent]]:
    """Add request i before step arrivals[i]; step until idle."""
    events: dict[str, list[EngineEvent]] = {r.request_id: [] for r in requests}
    step = 0
    while True:
        for req, arrival in zip(requests, arrivals, strict=True):
            if arrival == step:
                engine.add_request(req, events[req.request_id].append)
        has_work = engine.step()
        step += 1
        if not has_work and step > max(arrivals):
            return events


def record_prefill_batches(model: ChatModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], bool]]:
    """From now on, each pass of ``model.prefill_batch``: its chunks ``(prompt, start, end, cache)`` and
    ``has_images``, in order."""
    passes: list[tuple[list[Any], bool]] = []
    real = model.prefill_batch

    def recording(chunks: Any, *, has_images: bool) -> Any:
        passes.append((list(chunks), has_images))
        return real(chunks, has_images=has_images)

    monkeypatch.setattr(model, "prefill_batch", recording)
    return passes


def test_batched_greedy_output_equals_each_sequence_alone_as_they_join_and_leave(model: ChatModel) -> None:
    requests = [request(f"r{i}", (user(prompt),), tokens) for i, (prompt, tokens) in
                enumerate(zip(PROMPTS, [12, 3, 20, 7], strict=True))]
    expected = {req.request_id: solo(model, req) for req in requests}
    engine = Engine(model, max_num_running=4)
    events = staggered(engine, requests, arrivals=[0, 0, 2, 5])
    for req in requests:
        alone_text, alone_done = expected[req.request_id]
        done = events[req.request_id][-1]
        assert isinstance(done, Finished)
        assert text(events[req.request_id]) == alone_text
        assert (done.reason, done.num_output_tokens) == (alone_done.reason, alone_done.num_output_tokens)


def test_one_forward_pass_decodes_every_running_sequence(model: ChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = model.decode_batch

    def counting(token_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(token_ids.shape[0])
        return real(token_ids, *args, **kwargs)

    monkeypatch.setattr(model, "decode_batch", counting)
    engine = Engine(model, max_num_running=3)
    staggered(engine, [request(f"r{i}", (user(PROMPTS[i]),), 10) for i in range(3)], arrivals=[0, 0, 0])
    # the three prompts, admitted together, are prefilled together: every pass decodes all three
    assert sizes[0] == 3 and max(sizes) == 3
    assert len(sizes) <= 9  # not one pass per sequence and token (27)


def test_seeded_sampling_in_a_batch_equals_sampling_alone(model: ChatModel) -> None:
    requests = [request(f"s{i}", (user(PROMPTS[i]),), 10, temperature=0.9, seed=i) for i in range(3)]
    expected = {req.request_id: solo(model, req)[0] for req in requests}
    events = staggered(Engine(model, max_num_running=3), requests, arrivals=[0, 1, 1])
    assert {rid: text(evs) for rid, evs in events.items()} == expected


def test_sequences_with_and_without_images_batch_apart_and_match_their_solo_output(tmp_path: Path) -> None:
    llava = load_tiny_llava_chat(tmp_path / "llava")
    requests = [
        request("a", (ChatMessage("user", (TextChunk("What is in this picture?"), image_chunk(make_image(1)))),), 8),
        request("b", (user("Hello there"),), 6),
        request("c", (ChatMessage("user", (TextChunk("Describe it."), image_chunk(make_image(2)))),), 5),
    ]
    expected = {req.request_id: solo(llava, req)[0] for req in requests}
    events = staggered(Engine(llava, max_num_running=3), requests, arrivals=[0, 0, 1])
    assert {rid: text(evs) for rid, evs in events.items()} == expected


# ---------------------------------------------------------------- chunked prefill


def test_chunked_prefill_equals_whole_prefill_with_text_and_images(model: ChatModel, tmp_path: Path) -> None:
    long = request("long", (user(" ".join(PROMPTS * 3)),), 10)
    whole = solo(model, long)[0]
    chunked, finished = run_alone(Engine(model, prefill_chunk_tokens=7), long)
    assert chunked == whole and finished.reason == "length"

    llava = load_tiny_llava_chat(tmp_path / "llava")
    pictured = request("p", (ChatMessage("user", (TextChunk("Compare"), image_chunk(make_image(3)), TextChunk("and"),
                                                  image_chunk(make_image(4)))),), 8)
    expected = solo(llava, pictured)[0]
    for chunk in (3, 16, 17):  # boundaries inside image slots move to their ends
        events = []
        engine = Engine(llava, prefill_chunk_tokens=chunk)
        engine.add_request(pictured, events.append)
        while engine.step():
            pass
        assert text(events) == expected and events[-1].reason == "length", chunk  # type: ignore[union-attr]


def test_prefill_batch_gives_each_row_its_prefill_alone(model: ChatModel) -> None:
    """Rows with no cache, a short one and a long one, chunks of different lengths: each row's logits and cache
    are its own prefill's (float32: equal up to the order of sums)."""
    prompts = [model.render((user(text),), 1000) for text in ("Hello", PROMPTS[2], PROMPTS[0])]
    chunks, alone = [], []
    for prompt, start in zip(prompts, [0, 5, 12], strict=True):
        cache = model.prefill(prompt, end=start)[1] if start else None
        chunks.append((prompt, start, len(prompt.token_ids), cache))
        alone.append(model.prefill(prompt))
    logits, caches = model.prefill_batch(chunks, has_images=False)
    for (expected_logits, expected_cache), row_logits, cache in zip(alone, logits, caches, strict=True):
        assert torch.allclose(row_logits, expected_logits, atol=1e-4)
        assert cache.get_seq_length() == expected_cache.get_seq_length()
        for mine, theirs in zip(cache.layers, expected_cache.layers, strict=True):
            assert torch.allclose(mine.keys, theirs.keys, atol=1e-4)
            assert torch.allclose(mine.values, theirs.values, atol=1e-4)


NEAR_TIE = 0.05  # logits


def rounds_inputs(model: ChatModel) -> bool:
    """Whether every product rounds its inputs to int8 steps of their group (int4-cpu on the project's kernel, or
    to bfloat16 on PyTorch's)."""
    return any(isinstance(module, Int4Linear) for module in model.hf_model.modules())


def cold_before_a_near_tie(model: ChatModel, req: GenerationRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``req``'s output alone with a cold cache, up to (not including) its first token picked over another within
    :data:`NEAR_TIE` of it; all of it if none was. Where a model rounds every product's inputs (int4-cpu), prompts
    prefilled side by side equal their prefill alone up to float32 rounding (test_prefill_batch_gives_each_row_its_
    prefill_alone), and rounding that moves an input across an int8 step moves logits by a few hundredths: the
    tiny model's cold run here had gaps of 0.03 and 0.05 between its top two logits, and a 2-core Intel Xeon picked
    the other token at the first of them where an AMD EPYC had not. Up to there the outputs must be equal."""
    gaps: list[float] = []
    sample = engine_module.sample

    def recording(logits: torch.Tensor, *args: Any, **kwargs: Any) -> int:
        top = torch.topk(logits.float(), 2).values
        gaps.append(float(top[0] - top[1]))
        return sample(logits, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "sample", recording)
        solo(model, req)
    ties = [step for step, gap in enumerate(gaps) if gap < NEAR_TIE]
    if not ties:
        return solo(model, req)[0]
    if ties[0] == 0:
        return ""
    return solo(model, dataclasses.replace(req, params=req.params.replace(max_output_tokens=ties[0])))[0]


def test_prompts_admitted_together_are_prefilled_in_one_pass_whatever_their_reused_prefixes(
        model: ChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A follow-up turn (most of its prompt reused from the previous turn's KV cache), a new conversation and
    one sharing only the system prompt arrive together: their prompts go through one forward pass, each row
    beside caches of other lengths, and each output equals the request's alone with a cold cache."""
    system = ChatMessage("system", (TextChunk("You answer briefly."),))
    first_turn = (system, user(PROMPTS[0]))
    engine = Engine(model, max_num_running=4, kv_cache_bytes=1 << 24)
    answer, _ = run_alone(engine, request("turn1", first_turn, 6))
    requests = [request("turn2", (*first_turn, ChatMessage("assistant", (TextChunk(answer),)), user("Why?")), 8),
                request("new", (user(PROMPTS[2]),), 8), request("same-system", (system, user(PROMPTS[1])), 8)]
    expected = {req.request_id: solo(model, req)[0] for req in requests}
    passes = record_prefill_batches(model, monkeypatch)
    events = staggered(engine, requests, arrivals=[0, 0, 0])
    assert [len(chunks) for chunks, _ in passes] == [3]
    if rounds_inputs(model):  # equal up to the first near tie of the cold run (see cold_before_a_near_tie)
        expected = {req.request_id: cold_before_a_near_tie(model, req, monkeypatch) for req in requests}
        assert all(text(events[rid]).startswith(prefix) for rid, prefix in expected.items()), expected
    else:
        assert {rid: text(evs) for rid, evs in events.items()} == expected
    cached = {rid: evs[-1].num_cached_tokens for rid, evs in events.items()}  # type: ignore[union-attr]
    assert cached["turn2"] > cached["same-system"] > cached["new"]  # three lengths of reused prefix side by side


def test_follow_ups_of_image_conversations_are_prefilled_together_with_the_image_adapter_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two conversations' second turns, their images inside the KV prefix each reuses: their new text goes
    through one pass (the vision model's image adapter on, as for any sequence that holds an image), and each
    answer equals the turn's alone with a cold cache."""
    llava = load_tiny_llava_chat(tmp_path / "llava")
    engine = Engine(llava, max_num_running=2, kv_cache_bytes=1 << 24)
    follow_ups = []
    for i in range(2):
        first = ChatMessage("user", (TextChunk("What is in this picture?"), image_chunk(make_image(i))))
        answer, _ = run_alone(engine, request(f"turn1-{i}", (first,), 5))
        follow_ups.append(request(f"turn2-{i}", (first, ChatMessage("assistant", (TextChunk(answer),)),
                                                 user("And the colours?")), 6))
    expected = {req.request_id: solo(llava, req)[0] for req in follow_ups}
    passes = record_prefill_batches(llava, monkeypatch)
    events = staggered(engine, follow_ups, arrivals=[0, 0])
    # both admitted in one step: their images are in the image cache already
    assert [(len(chunks), has_images) for chunks, has_images in passes] == [(2, True)]
    assert {rid: text(evs) for rid, evs in events.items()} == expected


def test_a_prompt_cached_but_its_last_position_is_fed_by_the_decode_step(model: ChatModel,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same question again (a retried response, another conversation asking it): its KV cache holds every
    position but the last, and that one goes through the decode step beside the running rows, with no forward
    pass of its own; the answer is the one it gave with a cold cache."""
    engine = Engine(model, max_num_running=4, kv_cache_bytes=1 << 24)
    cold, _ = run_alone(engine, request("first", (user(PROMPTS[0]),), 8))
    beside = request("running", (user(PROMPTS[1]),), 12)
    expected_beside = solo(model, beside)[0]
    running: list[EngineEvent] = []
    engine.add_request(beside, running.append)
    engine.step()
    prefills: list[str] = []
    monkeypatch.setattr(model, "prefill", lambda *args, **kwargs: prefills.append("prefill"))
    monkeypatch.setattr(model, "prefill_batch", lambda *args, **kwargs: prefills.append("prefill_batch"))
    again, finished = run_alone(engine, request("again", (user(PROMPTS[0]),), 8))
    assert again == cold and prefills == []
    assert finished.num_cached_tokens == finished.num_prompt_tokens - 1
    assert text(running) == expected_beside


def test_prompts_prefilled_together_stay_within_one_chunk_of_positions(model: ChatModel,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With a chunk of 50 positions, prompts of 18 to 24 go two to a pass (padding counted), not all four."""
    passes = record_prefill_batches(model, monkeypatch)
    requests = [request(f"r{i}", (user(prompt),), 4) for i, prompt in enumerate(["Hello", "Hi there", "Good day",
                                                                                 "Hey"])]
    expected = {req.request_id: solo(model, req)[0] for req in requests}
    events = staggered(Engine(model, max_num_running=4, prefill_chunk_tokens=50), requests, arrivals=[0, 0, 0, 0])
    positions = [len(chunks) * max(end - start for _, start, end, _ in chunks) for chunks, _ in passes]
    assert len(positions) == 2 and all(count <= 50 for count in positions)
    assert {rid: text(evs) for rid, evs in events.items()} == expected


def test_prompts_with_images_start_one_a_step_and_keep_their_solo_output(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission takes every free slot at once, but an image's encoding takes a step's time: of three prompts with
    images not encoded yet arriving together, one starts (encodes) a step."""
    llava = load_tiny_llava_chat(tmp_path / "llava")
    requests = [request(f"p{i}", (ChatMessage("user", (TextChunk("Describe it."), image_chunk(make_image(i)))),), 5)
                for i in range(3)]
    expected = {req.request_id: solo(llava, req)[0] for req in requests}
    llava.image_cache.clear()  # the solo runs encoded them
    encodes_per_step: list[int] = []
    real = llava.encode_images

    def counting(images: Any, source: Any) -> Any:
        encodes_per_step[-1] += bool(images)
        return real(images, source)

    monkeypatch.setattr(llava, "encode_images", counting)
    engine = Engine(llava, max_num_running=3)
    events: dict[str, list[EngineEvent]] = {req.request_id: [] for req in requests}
    for req in requests:
        engine.add_request(req, events[req.request_id].append)
    while True:
        encodes_per_step.append(0)
        if not engine.step():
            break
    assert encodes_per_step[:3] == [1, 1, 1]
    assert {rid: text(evs) for rid, evs in events.items()} == expected


def test_a_long_prompt_delays_running_streams_by_one_chunk_a_step(model: ChatModel) -> None:
    engine = Engine(model, prefill_chunk_tokens=16)
    running: list[EngineEvent] = []
    engine.add_request(request("running", (user("Hello"),), 60), running.append)
    while not any(s.output_token_ids for s in engine.scheduler.running):  # its 18 positions: two chunks
        engine.step()
    arriving: list[EngineEvent] = []
    long = (user(" ".join(PROMPTS * 2)),)  # 151 positions of the tiny model's 256
    engine.add_request(request("long", long, 4), arriving.append)
    num_chunks = -(-len(model.render(long, 10_000).token_ids) // 16)
    steps = 0

    def has_started() -> bool:  # its first token is sampled (the text may wait for a whole character)
        return bool(arriving) or any(s.request_id == "long" and s.output_token_ids for s in engine.scheduler.running)

    while not has_started():
        before = sum(isinstance(e, TokenDelta) for e in running)
        engine.step()
        steps += 1
        assert any(isinstance(e, Finished) for e in running) or sum(
            e.num_tokens for e in running if isinstance(e, TokenDelta)) >= before  # the stream went on
    assert steps == num_chunks >= 5  # one chunk a step, the running stream decoding beside each
    while engine.step():
        pass
    assert text(running) == solo(model, request("running", (user("Hello"),), 60))[0]


# ---------------------------------------------------------------- the KV memory budget


def test_over_the_kv_budget_the_newest_is_preempted_and_resumes_with_the_same_output(model: ChatModel) -> None:
    """Three sequences whose caches cannot all fit: the newest gives its place up (its cache dropped) and
    resumes later, recomputed; every output equals the sequence's output alone, greedy and seeded-sampled."""
    requests = [request("a", (user(PROMPTS[0]),), 30), request("b", (user(PROMPTS[2]),), 30, temperature=0.9, seed=4),
                request("c", (user(PROMPTS[3]),), 30)]
    expected = {req.request_id: solo(model, req) for req in requests}
    probe = Engine(model)
    probe_events: list[EngineEvent] = []
    probe.add_request(request("p", (user(PROMPTS[0]),), 1), probe_events.append)
    probe.step()
    per_position = probe._kv_bytes_per_position
    assert per_position
    engine = Engine(model, max_num_running=3, max_kv_bytes=int(per_position * 130))  # about two sequences' worth
    preempted: list[str] = []
    real_preempt = engine._preempt

    def recording(seq: Any) -> None:
        preempted.append(seq.request_id)
        real_preempt(seq)

    engine._preempt = recording  # type: ignore[method-assign]
    events = staggered(engine, requests, arrivals=[0, 0, 1])
    assert preempted and "a" not in preempted  # the newest give way; the oldest runs on
    for req in requests:
        alone_text, alone_done = expected[req.request_id]
        done = events[req.request_id][-1]
        assert isinstance(done, Finished) and text(events[req.request_id]) == alone_text, req.request_id
        assert (done.reason, done.num_output_tokens) == (alone_done.reason, alone_done.num_output_tokens)


def test_one_sequence_alone_runs_whatever_the_budget(model: ChatModel) -> None:
    req = request("only", (user(PROMPTS[2]),), 12)
    alone = solo(model, req)[0]
    squeezed, finished = run_alone(Engine(model, max_kv_bytes=1), req)
    assert squeezed == alone and finished.reason == "length"


def test_rows_that_join_and_leave_between_two_steps_are_copied_in_once(model: ChatModel,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that leave and join between two steps change the batch's cache once, at the next step: one
    concatenation of keys and one of values a layer (each row joining alone copied the whole batch's cache: eight
    answers ending together moved it eight times); every row still gets its own logits, and num_bytes says before
    the step what the step's cache holds."""
    rows, caches, tokens = [object() for _ in PROMPTS], [], []
    for text in PROMPTS:
        logits, cache = model.prefill(model.render((user(text),), 1000))
        caches.append(cache)
        tokens.append(int(logits.argmax()))
    alone = []
    for index in (1, 3):  # the rows that stay and the row that joins late, each alone, for their logits
        solo_batch = DecodeBatch(model, has_images=False)
        solo_batch.add(object(), copy_positions(caches[index], model.new_cache, 0, caches[index].get_seq_length()))
        alone.append(solo_batch.step([tokens[index]])[0])
    batch = DecodeBatch(model, has_images=False)
    for row, cache in zip(rows[:3], caches[:3], strict=True):
        batch.add(row, cache)
    batch.step(tokens[:3])
    batch.remove(rows[0])
    batch.remove(rows[2])
    batch.add(rows[3], caches[3])
    expected_bytes, width = batch.num_bytes(), batch.width  # before the step appends a position to every row
    concatenations = []
    concatenate = torch.cat

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        concatenations.append(len(tensors))
        return concatenate(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", counting)
    second = batch.step([tokens[1], tokens[3]])  # row 1's second token fed again: its logits move on, not checked
    monkeypatch.undo()
    layers = len(batch.cache.layers)
    assert concatenations[:2 * layers + 1].count(2) >= 2 * layers  # keys and values a layer, then the mask
    assert cache_bytes(batch.cache) == expected_bytes // width * (width + 1)
    assert batch.num_bytes() == cache_bytes(batch.cache)
    assert batch.lengths == [caches[1].get_seq_length() + 2, caches[3].get_seq_length() + 1]
    assert torch.allclose(second[1], alone[1], atol=1e-4)  # the row that joined: its own first step
