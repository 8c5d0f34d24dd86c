"""Image-embedding cache: every image is encoded once per vision part and detail.

An entry is keyed by ``(vision identity, image sha256, preprocess key)``: the
weights and preprocessing, the image bytes, and the resolution/token count the
detail chose. Values are ``(T, h)`` embedding tensors, kept on whatever device
the encoder produced them. The cache is bounded in bytes (``numel *
element_size``) and evicts least-recently-used entries; a single tensor larger
than the budget is returned to the caller but not stored. All methods are
thread-safe (one lock; no tensor work is done while holding it).

:func:`encode_cached` looks every image up, loads the misses in one call (one
store query), encodes them in one batch per detail, stores them, and says which
images were hits, so the model can count the image *tokens* served from the
cache when details differ.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image

from assistant.engine.vision import VisionPart

CacheKey = tuple[str, str, str]  # (vision identity, image sha256, preprocess key)
ImageRef = tuple[str, str]  # (sha256, detail)
# The decoded images of the given sha256s, all in one call; raises when one cannot be had.
ImageLoader = Callable[[Sequence[str]], Mapping[str, Image.Image]]


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``key``'s embedding is kept (neither a use nor a hit: the order and the counts stay)."""
        with self._lock:
            return key in self._entries

    def get(self, key: CacheKey) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: CacheKey, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.num_bytes -= old.numel() * old.element_size()
            if size > self.max_bytes:
                return
            self._entries[key] = value
            self.num_bytes += size
            while self.num_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.num_bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0


def cache_key(vision: VisionPart, sha256: str, detail: str) -> CacheKey:
    """Where an image's embedding at ``detail`` is kept: the same bytes, encoder and preprocessing."""
    return vision.identity, sha256, vision.preprocess_key(detail)


def encode_cached(vision: VisionPart, cache: EmbeddingCache, images: list[ImageRef],
                  load: ImageLoader) -> tuple[list[torch.Tensor], list[bool]]:
    """Embeddings for ``images`` in order, each ``(num_tokens(detail), hidden_size)``, and one flag per image:
    whether its embedding came from the cache.

    ``load`` runs once, for the misses only (not at all when everything is cached).
    An image repeated within one call is encoded once; a repeat of an image missed
    earlier in the same call is not a hit: it was encoded by this call. Raises what
    ``load`` or the encoder raises; nothing is stored then.
    """
    results: list[torch.Tensor | None] = [None] * len(images)
    hits = [False] * len(images)
    positions: dict[CacheKey, list[int]] = {}  # misses: key → where its embedding goes
    firsts: dict[CacheKey, tuple[str, str]] = {}  # key → (sha256, detail) of its first use
    for position, (sha256, detail) in enumerate(images):
        key = cache_key(vision, sha256, detail)
        cached = None if key in positions else cache.get(key)
        if cached is not None:
            results[position] = cached
            hits[position] = True
            continue
        positions.setdefault(key, []).append(position)
        firsts.setdefault(key, (sha256, detail))
    if not firsts:
        return results, hits  # type: ignore[return-value]
    pictures = load(list(dict.fromkeys(sha256 for sha256, _ in firsts.values())))
    by_detail: dict[str, list[CacheKey]] = {}
    for key, (_, detail) in firsts.items():
        by_detail.setdefault(detail, []).append(key)
    for detail, keys in by_detail.items():
        embeddings = vision.encode([pictures[firsts[key][0]] for key in keys], detail)  # (N, T, h)
        for key, embedding in zip(keys, embeddings, strict=True):
            embedding = embedding.clone()  # (T, h); a view would pin the whole batch in memory
            cache.put(key, embedding)
            for position in positions[key]:
                results[position] = embedding
    return results, hits  # type: ignore[return-value]
