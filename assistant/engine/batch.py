"""The running batch: one forward pass decodes one token for every running sequence.

A :class:`DecodeBatch` owns one KV cache for all its rows: each layer's keys and
values are ``(B, H, L, D)``, every row right-aligned (left-padded) to the longest,
with an attention mask ``(B, L)`` that is 0 on the padding and per-row positions
(a row's next position is its own length, whatever the padding), so every row
computes exactly what it would alone. Rows join between steps, with the cache their
prefill filled (:meth:`DecodeBatch.add`: the batch and the newcomer are padded to
the longer of the two), and leave between steps (:meth:`DecodeBatch.remove`, which
hands the row's own unpadded cache back and trims padding no row needs any more).
A decode step feeds each row's last token (:meth:`DecodeBatch.step`) and returns
``(B, vocab)`` logits, sampled row by row by the engine with each request's own
settings and seed.

The model's image adapter is switched per forward pass
(:meth:`~assistant.engine.model.ChatModel.forward`), so sequences with and without
images decode in two batches. Engine thread only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from assistant.engine.model import ChatModel
from assistant.engine.prefix_cache import copy_positions


class DecodeBatch:
    def __init__(self, model: ChatModel, has_images: bool) -> None:
        self.model, self.has_images = model, has_images
        self.rows: list[Any] = []  # the sequences, in row order
        self.lengths: list[int] = []  # positions each row holds (its own length, without padding)
        self.cache: Any = None  # one cache of batch size len(rows), layers (B, H, L, D)
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 on a row's positions, 0 on its left padding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, row: Any, cache: Any) -> None:
        """Join ``row`` whose prefilled cache (batch size 1) is ``cache``; the batch takes the cache over."""
        length = cache.get_seq_length()
        device = self.model.device
        ones = torch.ones((1, length), dtype=torch.long, device=device)  # (1, T)
        if not self.rows:
            self.rows, self.lengths, self.cache, self.mask = [row], [length], cache, ones
            return
        width = max(self.width, length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])  # (B + 1, H, L, D)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        assert self.mask is not None
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(ones, (width - length, 0))])
        self.rows.append(row)
        self.lengths.append(length)

    def remove(self, row: Any, *, keep_cache: bool = True) -> Any:
        """Take ``row`` out; return its own cache (batch size 1, no padding), or None when not ``keep_cache``."""
        index = next(i for i, r in enumerate(self.rows) if r is row)
        width, length = self.width, self.lengths[index]
        own = copy_positions(self.cache, self.model.new_cache, width - length, width, row=index) if keep_cache else None
        del self.rows[index], self.lengths[index]
        if not self.rows:
            self.cache, self.mask = None, None
            return own
        keep = [i for i in range(len(self.rows) + 1) if i != index]
        trim = width - max(self.lengths)  # padding columns no remaining row needs
        assert self.mask is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep, :, trim:, :]  # advanced indexing copies: no view pins the old batch
            layer.values = layer.values[keep, :, trim:, :]
        self.mask = self.mask[keep, trim:]
        return own

    def repair(self) -> None:
        """After a failed :meth:`step`: drop the column the layers it reached had appended already."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :self.width, :], layer.values[..., :self.width, :]

    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Feed one token per row (in row order); return the next-token logits ``(B, vocab)`` float32."""
        assert self.mask is not None and len(token_ids) == len(self.rows)
        device = self.model.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)[:, None]  # (B, 1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device)[:, None]  # (B, 1)
        mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        logits = self.model.decode_batch(ids, positions, mask, self.cache, has_images=self.has_images)
        self.mask = mask
        self.lengths = [length + 1 for length in self.lengths]
        return logits


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, L, D) → (B, H, width, D), zeros on the left."""
    return F.pad(x, (0, 0, width - x.shape[-2], 0))
