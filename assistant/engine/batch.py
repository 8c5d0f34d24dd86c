"""The running batch: one forward pass decodes one token for every running sequence.

A :class:`DecodeBatch` owns one KV cache for all its rows: each layer's keys and
values are ``(B, H, L, D)``, every row right-aligned (left-padded) to the longest,
with an attention mask ``(B, L)`` that is 0 on the padding and per-row positions
(a row's next position is its own length, whatever the padding), so every row
computes exactly what it would alone. Rows join between steps, with the cache their
prefill filled (:meth:`DecodeBatch.add`), and leave between steps
(:meth:`DecodeBatch.remove`, which hands the row's own unpadded cache back). The
batch's cache is rebuilt once, at the next step, for every row that joined or left
since the last (padded to the longest row, padding no row needs trimmed): eight rows
joining or leaving together copy the cache once, not eight times (each copy of an
eight-row cache of 200 positions moves about 37 MB on SmolLM2-135M in bf16). A decode
step feeds each row's last token (:meth:`DecodeBatch.step`) and returns ``(B, vocab)``
logits, sampled row by row by the engine with each request's own settings and seed.

The model's image adapter is switched per forward pass
(:meth:`~assistant.engine.model.ChatModel.forward`), so sequences with and without
images decode in two batches. Engine thread only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from assistant.engine.model import ChatModel
from assistant.engine.prefix_cache import cache_bytes, copy_positions


class DecodeBatch:
    def __init__(self, model: ChatModel, has_images: bool) -> None:
        self.model, self.has_images = model, has_images
        self.rows: list[Any] = []  # the sequences, in row order: those kept from the last step, then those joining
        self.lengths: list[int] = []  # positions each row holds (its own length, without padding)
        # One cache of the rows as of the last step (or rebuild), layers (B, H, L, D); rows that left since still
        # hold their places in it, rows that joined are not in it yet. None: no row.
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 on a row's positions, 0 on its left padding
        self._kept: list[int] = []  # for each row kept from the last step (the first rows): its row of self.cache
        self._joining: list[Any] = []  # for each row that joined since (the last rows): its own cache

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Positions of the batch's cache: its longest row's length."""
        return max(self.lengths, default=0)

    def add(self, row: Any, cache: Any) -> None:
        """Join ``row`` whose prefilled cache (batch size 1) is ``cache``; the batch takes the cache over (into
        its own at the next step)."""
        self.rows.append(row)
        self.lengths.append(cache.get_seq_length())
        self._joining.append(cache)

    def remove(self, row: Any, *, keep_cache: bool = True) -> Any:
        """Take ``row`` out; return its own cache (batch size 1, no padding), or None when not ``keep_cache``."""
        index = next(i for i, r in enumerate(self.rows) if r is row)
        length = self.lengths[index]
        del self.rows[index], self.lengths[index]
        if index >= len(self._kept):  # it joined since the last step: its cache is still its own
            cache = self._joining.pop(index - len(self._kept))
            own = cache if keep_cache else None
        else:
            slot = self._kept.pop(index)
            own = None
            if keep_cache:
                assert self.mask is not None
                width = int(self.mask.shape[1])
                own = copy_positions(self.cache, self.model.new_cache, width - length, width, row=slot)
        if not self.rows:
            self.cache, self.mask = None, None
        return own

    def repair(self) -> None:
        """After a failed :meth:`step`: drop the column the layers it reached had appended already."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :self.width, :], layer.values[..., :self.width, :]

    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Feed one token per row (in row order); return the next-token logits ``(B, vocab)`` float32."""
        assert len(token_ids) == len(self.rows)
        self._rebuild()
        assert self.mask is not None
        device = self.model.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)[:, None]  # (B, 1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device)[:, None]  # (B, 1)
        mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        logits = self.model.decode_batch(ids, positions, mask, self.cache, has_images=self.has_images)
        self.mask = mask
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def num_bytes(self) -> int:
        """Bytes of the rows' KV caches as the next step holds them: every row padded to the longest."""
        if not self.rows:
            return 0
        sample = self.cache if self.cache is not None else self._joining[0]
        keys = sample.layers[0].keys  # (B, H, L, D); every layer and the values alike
        per_position = cache_bytes(sample) / max(1, keys.shape[0] * keys.shape[-2])
        return int(len(self.rows) * self.width * per_position)

    def _rebuild(self) -> None:
        """Make the cache hold exactly the rows, in order: the rows kept (padding no row needs trimmed), then the
        rows that joined, each padded on the left to the longest, in one copy of each layer."""
        kept, joining = self._kept, self._joining
        if not joining and self.mask is not None and len(kept) == self.mask.shape[0]:
            return  # nobody joined or left
        width, device = self.width, self.model.device
        if self.cache is None and len(joining) == 1:  # the first row: its cache becomes the batch's as it is
            self.cache, self.mask = joining[0], torch.ones((1, width), dtype=torch.long, device=device)
        else:
            trim = 0 if self.mask is None else max(0, int(self.mask.shape[1]) - width)  # only rows that left needed
            base = self.cache if self.cache is not None else joining[0]

            def rows_of(batched: torch.Tensor, joined: list[torch.Tensor]) -> torch.Tensor:
                """The kept rows of ``batched`` (B, H, L, D) (one copy: no view pins the old batch), then the
                joiners', padded on the left to the batch's width."""
                parts = [_left_pad(part, width) for part in ([batched[kept, :, trim:, :]] if kept else []) + joined]
                return parts[0] if len(parts) == 1 else torch.cat(parts)

            rebuilt = [(rows_of(layer.keys, [cache.layers[i].keys for cache in joining]),
                        rows_of(layer.values, [cache.layers[i].values for cache in joining]))
                       for i, layer in enumerate(base.layers)]
            masks = [self.mask[kept, trim:]] if kept else []
            masks += [torch.ones((1, length), dtype=torch.long, device=device) for length in self.lengths[len(kept):]]
            self.mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in masks])
            for layer, (keys, values) in zip(base.layers, rebuilt, strict=True):
                layer.keys, layer.values = keys, values
            self.cache = base
        self._kept, self._joining = list(range(len(self.rows))), []


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, L, D) → (B, H, width, D), zeros on the left; ``x`` itself when it is that wide."""
    return x if x.shape[-2] == width else F.pad(x, (0, 0, width - x.shape[-2], 0))
