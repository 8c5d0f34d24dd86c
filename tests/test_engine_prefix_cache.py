"""KV reuse across turns: the PrefixCache alone, then through the engine on tiny random-weight models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from assistant.engine.engine import Engine
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from assistant.engine.prefix_cache import PrefixCache, common_prefix, copy_positions
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk, TokenDelta
from assistant.engine.sampling import SamplingParams
from tests.engine_fixtures import message, save_tiny_chat_model, user
from tests.vision_fixtures import IMAGES, image_chunk, load_tiny_llava_chat, make_image


class Layer:
    def __init__(self, keys: torch.Tensor) -> None:
        self.keys, self.values = keys, keys.clone()


class FakeCache:
    """What PrefixCache needs of a transformers cache: its length, crop, update, and K/V tensors (1, 1, T, 2)."""

    def __init__(self, length: int = 0, first: float = 0.0) -> None:
        self.layers = [Layer(torch.arange(first, first + length).repeat_interleave(2).view(1, 1, length, 2))]

    def get_seq_length(self) -> int:
        return self.layers[0].keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove < 0
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[..., :tokens_to_remove, :], layer.values[..., :tokens_to_remove, :]

    def update(self, keys: torch.Tensor, values: torch.Tensor, index: int) -> None:
        assert index == 0 and self.get_seq_length() == 0
        self.layers[0].keys, self.layers[0].values = keys, values


def test_a_cache_its_prompt_continues_whole_is_taken_and_a_partly_shared_one_copied() -> None:
    cache = PrefixCache(max_bytes=1 << 20, new_cache=FakeCache)
    continued = FakeCache(3)
    cache.put((1, 2, 3), False, continued)
    taken, length = cache.take((1, 2, 3, 4, 5), False)  # the next turn of that conversation
    assert taken is continued and length == 3 and len(cache) == 0  # taken, not copied: the next turn owns it

    shared = FakeCache(5, first=10.0)
    cache.put((1, 2, 3, 4, 5), False, shared)
    copied, length = cache.take((1, 2, 3, 7, 8), False)  # another conversation with the same start
    assert length == 3 and copied is not shared and len(cache) == 1
    assert copied.layers[0].keys[0, 0, :, 0].tolist() == [10.0, 11.0, 12.0]
    assert shared.get_seq_length() == 5  # its own conversation keeps its whole cache
    assert cache.take((1, 2, 3, 4, 5, 6), True) == (None, 0)  # a cache without the image adapter never serves one
    assert cache.take((5, 6), False) == (None, 0)


def test_one_position_is_always_left_to_compute_and_images_are_never_split() -> None:
    cache = PrefixCache(max_bytes=1 << 20, new_cache=FakeCache)
    cache.put((1, 2, 3), False, FakeCache(3))
    assert cache.take((1, 2, 3), False)[1] == 2  # the whole prompt cached: its last position is run again
    image = ("a" * 64, "high")
    cache.put((1, image, image, image, 5), True, FakeCache(5))
    assert cache.take((1, image, image, image, 6), True)[1] == 4
    cache.put((1, image, image, 5), True, FakeCache(4))
    assert cache.take((1, image, image), True)[1] == 1  # would end inside the image: back to its start


def test_the_budget_evicts_the_oldest_entries_and_refuses_oversized_ones() -> None:
    per_position = 2 * 2 * 4  # keys and values of FakeCache: 2 floats each per position
    cache = PrefixCache(max_bytes=10 * per_position, new_cache=FakeCache)
    cache.put((1,) * 4, False, FakeCache(4))
    cache.put((2,) * 4, False, FakeCache(4))
    cache.put((3,) * 4, False, FakeCache(4))  # 12 positions: the oldest goes
    assert len(cache) == 2 and cache.num_bytes == 8 * per_position
    cache.put((4,) * 11, False, FakeCache(11))  # larger than the whole budget: not kept
    assert len(cache) == 2
    assert cache.take((1, 1, 1), False) == (None, 0)


def test_common_prefix() -> None:
    assert common_prefix((1, 2, 3), (1, 2, 4)) == 2
    assert common_prefix((1, 2), (1, 2, 3)) == 2
    assert common_prefix((), (1,)) == 0


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module", params=["none", "int8-cpu", "int4-cpu"])
def model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ChatModel:
    """The tiny model in float32, as it is and with --quantize int8-cpu and int4-cpu: all keep these equalities."""
    return load_chat_model(str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))), dtype="float32",
                           quantize=request.param)


def text_of(engine: Engine, messages: tuple[ChatMessage, ...], tokens: int = 8) -> tuple[str, Finished]:
    events: list[EngineEvent] = []
    engine.add_request(GenerationRequest("r", messages, SamplingParams(temperature=0.0, max_output_tokens=tokens),
                                         image_source=IMAGES), events.append)
    while engine.step():
        pass
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason in ("stop", "length"), finished
    return "".join(e.text for e in events if isinstance(e, TokenDelta)), finished


def run_conversation(engine: Engine, first: ChatMessage, follow_ups: list[str]) -> list[tuple[str, Finished]]:
    """Turn after turn, each prompt holding the whole history with the model's own answers, as the session does."""
    history: tuple[ChatMessage, ...] = (message("system", "Be brief."), first)
    results = []
    for follow_up in [*follow_ups, None]:
        reply, finished = text_of(engine, history)
        results.append((reply, finished))
        if follow_up is not None:
            history += (message("assistant", reply or "ok"), user(follow_up))
    return results


@pytest.mark.parametrize("follow_ups", [["Tell me more.", "And then?"]])
def test_output_after_kv_reuse_equals_output_with_a_cold_cache(model: ChatModel, follow_ups: list[str]) -> None:
    warm = run_conversation(Engine(model, kv_cache_bytes=1 << 24), user("What is the capital of France?"),
                            follow_ups)
    cold = run_conversation(Engine(model, kv_cache_bytes=0), user("What is the capital of France?"), follow_ups)
    assert [reply for reply, _ in warm] == [reply for reply, _ in cold]
    assert [f.num_cached_tokens for _, f in cold] == [0, 0, 0]
    assert warm[0][1].num_cached_tokens == 0
    for (_, previous), (_, finished) in zip(warm, warm[1:]):
        # most of the history came from the cache: at least the previous prompt
        assert previous.num_prompt_tokens <= finished.num_cached_tokens < finished.num_prompt_tokens
    assert [f.num_prompt_tokens for _, f in warm] == [f.num_prompt_tokens for _, f in cold]


def test_an_edited_history_reuses_only_what_comes_before_the_edit(model: ChatModel) -> None:
    engine = Engine(model, kv_cache_bytes=1 << 24)
    first = (message("system", "Be brief."), user("What is the capital of France?"))
    reply, done = text_of(engine, first)
    edited = (message("system", "Be very brief."), user("What is the capital of France?"),
              message("assistant", reply), user("Why?"))
    cold, _ = text_of(Engine(model), edited)
    warm, finished = text_of(engine, edited)
    assert warm == cold
    system_only = len(model.render(edited[:1], 10_000).token_ids)
    assert finished.num_cached_tokens < system_only  # the edit is in the system message: little is shared


def test_images_in_the_history_are_reused_not_encoded_again(tmp_path: Path) -> None:
    llava = load_tiny_llava_chat(tmp_path / "llava")
    picture = image_chunk(make_image(7))
    first = ChatMessage("user", (TextChunk("What is in this picture?"), picture))
    warm = run_conversation(Engine(llava, kv_cache_bytes=1 << 24), first, ["Tell me more."])
    llava.image_cache.clear()
    cold = run_conversation(Engine(llava, kv_cache_bytes=0), first, ["Tell me more."])
    assert [reply for reply, _ in warm] == [reply for reply, _ in cold]
    finished = warm[1][1]
    assert finished.num_cached_image_tokens == finished.num_image_tokens > 0  # inside the reused prefix
    assert finished.num_cached_tokens >= warm[0][1].num_prompt_tokens


def test_a_copy_of_positions_shares_no_memory_with_its_source(model: ChatModel) -> None:
    """copy_positions hands the prefix cache and a leaving row caches of their own: the copy is made by the
    empty cache's first update (its concatenation), so writing into the source afterwards (a batch decoding on,
    a buffer reused) leaves the copy as it was; new caches are copies of one template that stays empty."""
    _, cache = model.prefill(model.render((user("Hello there, how are you today?"),), 1000))
    length = cache.get_seq_length()
    copy = copy_positions(cache, model.new_cache, 1, length)
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in copy.layers]
    with torch.inference_mode():  # the prefill's tensors are inference tensors, written to as the engine does
        for layer in cache.layers:
            layer.keys.fill_(7.0)
            layer.values.fill_(7.0)
    for layer, (keys, values) in zip(copy.layers, kept, strict=True):
        assert layer.keys.shape[-2] == length - 1
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert model.new_cache().get_seq_length() == 0
