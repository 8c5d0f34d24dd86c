"""The image-embedding cache: counting, eviction by bytes, and images encoded only once."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from assistant.engine.cache import EmbeddingCache, encode_cached
from tests.vision_fixtures import make_image

HIDDEN = 8


class CountingVision:
    """A VisionPart that records every encode call; embeddings are a function of the image pixels."""

    identity = "counting:0"
    hidden_size = HIDDEN

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []  # (batch size, detail)

    def num_tokens(self, detail: str) -> int:
        return 2 if detail == "low" else 4

    def preprocess_key(self, detail: str) -> str:
        return f"{self.num_tokens(detail)}t"

    def encode(self, images: list[Image.Image], detail: str) -> torch.Tensor:
        self.calls.append((len(images), detail))
        means = torch.tensor([float(image.convert("L").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
                              for image in images])
        return means.view(-1, 1, 1).expand(-1, self.num_tokens(detail), HIDDEN).clone()  # (N, T, h)


def tensor(num_bytes: int) -> torch.Tensor:
    return torch.zeros(num_bytes // 4, dtype=torch.float32)


SEEDS = {"a": 1, "b": 2, "c": 3}  # the images, by sha256


class Loader:
    """The image source of encode_cached: records the sha256s of each call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, sha256s):
        self.calls.append(list(sha256s))
        return {sha: make_image(SEEDS[sha]) for sha in sha256s}


def test_get_and_put_count_hits_and_misses():
    cache = EmbeddingCache(max_bytes=1024)
    key = ("v", "sha", "224px/49t")

    assert cache.get(key) is None
    cache.put(key, tensor(64))
    assert torch.equal(cache.get(key), tensor(64))
    assert (cache.hits, cache.misses, cache.num_bytes, len(cache)) == (1, 1, 64, 1)


def test_asking_whether_a_key_is_kept_is_neither_a_hit_nor_a_use():
    cache = EmbeddingCache(max_bytes=200)
    a, b, c = ("v", "a", "p"), ("v", "b", "p"), ("v", "c", "p")
    cache.put(a, tensor(100))
    cache.put(b, tensor(100))
    assert a in cache and c not in cache and (cache.hits, cache.misses) == (0, 0)
    cache.put(c, tensor(100))  # a is still the least recently used: asking did not move it
    assert a not in cache and b in cache


def test_replacing_a_key_does_not_double_count():
    cache = EmbeddingCache(max_bytes=1024)
    cache.put(("v", "a", "p"), tensor(100))
    cache.put(("v", "a", "p"), tensor(200))
    assert (cache.num_bytes, len(cache)) == (200, 1)


def test_least_recently_used_is_evicted_by_bytes():
    cache = EmbeddingCache(max_bytes=300)
    a, b, c = ("v", "a", "p"), ("v", "b", "p"), ("v", "c", "p")
    cache.put(a, tensor(100))
    cache.put(b, tensor(100))
    cache.get(a)  # a is now more recent than b
    cache.put(c, tensor(200))  # 400 > 300: evict b (the least recently used), not a

    assert cache.get(b) is None
    assert cache.get(a) is not None and cache.get(c) is not None
    assert cache.num_bytes == 300


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = EmbeddingCache(max_bytes=100)
    cache.put(("v", "small", "p"), tensor(40))
    cache.put(("v", "huge", "p"), tensor(400))
    assert cache.get(("v", "huge", "p")) is None
    assert cache.get(("v", "small", "p")) is not None
    assert cache.num_bytes == 40


def test_the_key_separates_identity_image_and_preprocessing():
    cache = EmbeddingCache(max_bytes=1 << 20)
    cache.put(("v1", "sha", "224px/49t"), tensor(16))
    assert cache.get(("v2", "sha", "224px/49t")) is None
    assert cache.get(("v1", "other", "224px/49t")) is None
    assert cache.get(("v1", "sha", "224px/16t")) is None


def test_repeated_images_are_encoded_once_and_only_misses_are_loaded_in_one_call():
    vision, cache, load = CountingVision(), EmbeddingCache(max_bytes=1 << 20), Loader()
    first, hits = encode_cached(vision, cache, [("a", "high"), ("b", "high")], load)
    assert sum(hits) == 0 and vision.calls == [(2, "high")]

    again, hits = encode_cached(vision, cache, [("b", "high"), ("a", "high"), ("c", "high")], load)
    assert sum(hits) == 2
    assert vision.calls == [(2, "high"), (1, "high")]  # only c was encoded
    assert load.calls == [["a", "b"], ["c"]]  # one fetch per call; cached images are not even fetched
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    assert [t.shape for t in again] == [(4, HIDDEN)] * 3

    encode_cached(vision, cache, [("a", "high"), ("c", "high")], load)
    assert load.calls == [["a", "b"], ["c"]]  # all cached: nothing fetched


def test_misses_are_batched_per_detail_and_duplicates_encoded_once():
    vision, cache = CountingVision(), EmbeddingCache(max_bytes=1 << 20)
    load = Loader()
    embeddings, hits = encode_cached(vision, cache, [
        ("a", "low"), ("b", "high"), ("a", "low"), ("c", "low"), ("b", "auto")], load)

    assert sum(hits) == 0 and load.calls == [["a", "b", "c"]]
    assert sorted(vision.calls) == [(1, "high"), (2, "low")]  # a and c together; b once for high and auto
    assert [tuple(t.shape) for t in embeddings] == [(2, HIDDEN), (4, HIDDEN), (2, HIDDEN), (2, HIDDEN), (4, HIDDEN)]
    assert torch.equal(embeddings[0], embeddings[2])


def test_the_same_image_at_another_detail_is_another_entry():
    vision, cache = CountingVision(), EmbeddingCache(max_bytes=1 << 20)
    encode_cached(vision, cache, [("a", "high")], Loader())
    _, hits = encode_cached(vision, cache, [("a", "low")], Loader())
    assert sum(hits) == 0 and len(cache) == 2


def test_cached_entries_do_not_pin_the_batch():
    vision, cache = CountingVision(), EmbeddingCache(max_bytes=1 << 20)
    embeddings, _ = encode_cached(vision, cache, [("a", "high"), ("b", "high")], Loader())
    assert embeddings[0].untyped_storage().nbytes() == 4 * HIDDEN * 4  # its own (T, h) storage
    assert cache.num_bytes == 2 * 4 * HIDDEN * 4


def test_a_failing_loader_stores_nothing():
    vision, cache = CountingVision(), EmbeddingCache(max_bytes=1 << 20)

    def broken(sha256s):
        raise OSError("unreadable")

    with pytest.raises(OSError):
        encode_cached(vision, cache, [("a", "high"), ("bad", "high")], broken)
    assert len(cache) == 0


def test_concurrent_puts_keep_the_byte_count_exact():
    cache = EmbeddingCache(max_bytes=64 * 100)

    def worker(offset: int) -> None:
        for i in range(200):
            cache.put(("v", f"{offset}-{i % 50}", "p"), tensor(64))
            cache.get(("v", f"{offset}-{(i * 7) % 50}", "p"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.num_bytes == 64 * len(cache) <= 64 * 100
    assert cache.hits + cache.misses == 4 * 200
