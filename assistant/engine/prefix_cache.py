"""KV reuse across turns: a finished sequence's KV cache waits for the next turn of its conversation.

A follow-up turn's prompt starts with the previous turn's prompt and answer, so the
engine keeps each finished sequence's KV cache here, keyed by what its positions
hold: a text token id, or ``(image sha256, detail)`` at an image position (two
images with the same token count are told apart by their bytes). The next prompt
takes the entry that shares the longest prefix with it (:meth:`PrefixCache.take`),
cropped to that prefix, and prefills only the rest; so time to first token follows
the new text, not the history. Prefix matching makes invalidation automatic: a
deleted, inserted or edited item, other instructions or a truncated history change
the rendered prompt from that point, and only the part before it is reused.

An entry also records whether its sequence held an image (the model switches its
image LoRA adapter per sequence, :meth:`~assistant.engine.model.ChatModel.forward`):
a cache computed with the adapter off never serves a prompt that needs it on.

An entry the new prompt continues whole (the next turn of its conversation) is
taken, not copied: the next turn owns the cache, extends it, and puts it back when
it finishes. An entry it shares only a part with (the same system prompt and image
in another conversation, an edited history) stays for its own conversation, and
the new prompt gets a copy of the shared positions. The cache is bounded in bytes
(the K/V tensors' sizes) and evicts the least recently used entry first; an
entry larger than the whole budget is not kept. Engine thread only: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from assistant.engine.model import ImageSlot, Prompt

PositionKey = int | tuple[str, str]  # a token id, or (image sha256, detail) at an image position


def prompt_key(prompt: Prompt) -> tuple[PositionKey, ...]:
    """What each position of ``prompt`` holds."""
    key: list[PositionKey] = []
    for segment in prompt.segments:
        if isinstance(segment, ImageSlot):
            key.extend([(segment.image.sha256, segment.image.detail)] * segment.num_tokens)
        else:
            key.extend(segment)
    return tuple(key)


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Entry:
    key: tuple[PositionKey, ...]
    has_images: bool
    cache: Any
    num_bytes: int


def copy_positions(cache: Any, new_cache: Callable[[], Any], start: int, end: int, row: int = 0) -> Any:
    """A new cache (batch size 1, from ``new_cache``) holding copies of positions ``start`` to ``end`` of row
    ``row`` of ``cache``'s layers."""
    copy = new_cache()
    for index, layer in enumerate(cache.layers):  # update concatenates onto an empty cache: that is the copy
        copy.update(layer.keys[row:row + 1, :, start:end, :], layer.values[row:row + 1, :, start:end, :], index)
    return copy


def continues_image(key: Sequence[PositionKey], position: int) -> bool:
    """Whether ``position`` holds the same image as the position before it (a cut there would split the image;
    two identical images side by side count as one)."""
    return 0 < position < len(key) and not isinstance(key[position], int) and key[position - 1] == key[position]


class PrefixCache:
    def __init__(self, max_bytes: int, new_cache: Callable[[], Any]) -> None:
        """``new_cache`` makes an empty cache of the model's kind, for copies of shared prefixes."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._new_cache = new_cache
        self.num_bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: tuple[PositionKey, ...], has_images: bool, cache: Any) -> None:
        """Keep ``cache``, whose positions hold ``key``, for a later prompt that starts the same way."""
        size = cache_bytes(cache)
        if not key or size > self.max_bytes:
            return
        self._entries[self._next_id] = _Entry(key, has_images, cache, size)
        self._next_id += 1
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes

    def take(self, key: tuple[PositionKey, ...], has_images: bool) -> tuple[Any, int]:
        """A cache holding the longest prefix of ``key`` that an entry shares, and that prefix's length;
        ``(None, 0)`` when none shares a position. An entry that ``key`` continues whole is removed from here and
        returned; otherwise the shared positions are copied and the entry stays. At least one position of
        ``key`` is always left to compute (the next token's logits come from it), and a reused prefix never ends
        inside an image."""
        best_id, best = None, 0
        for entry_id, entry in self._entries.items():
            if entry.has_images == has_images:
                length = common_prefix(entry.key, key)
                if length > best:
                    best_id, best = entry_id, length
        best = _usable_length(key, best)
        if best_id is None or best == 0:
            return None, 0
        entry = self._entries[best_id]
        if best < len(entry.key):  # shared in part: the entry stays its own conversation's
            self._entries.move_to_end(best_id)
            return copy_positions(entry.cache, self._new_cache, 0, best), best
        del self._entries[best_id]
        self.num_bytes -= entry.num_bytes
        cached = entry.cache.get_seq_length()
        if cached > best:
            entry.cache.crop(best - cached)  # a negative count removes that many positions from the end
        return entry.cache, best


def _usable_length(key: tuple[PositionKey, ...], length: int) -> int:
    """``length`` shortened so that one position is left to compute and the prefix does not split an image."""
    length = min(length, len(key) - 1)
    while continues_image(key, length):
        length -= 1
    return max(length, 0)
