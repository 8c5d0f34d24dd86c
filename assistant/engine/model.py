"""The chat model: tokenizer + decoder (+ an optional vision part), rendered prompts, prefill and decode.

Contract:
- :meth:`ChatModel.render` turns chat messages into a :class:`Prompt`, a sequence
  of segments: runs of text token ids and :class:`ImageSlot` s (one per image,
  ``num_tokens`` positions long). The tokenizer's own chat template decides the
  text; images are rendered as unique sentinel strings, the rendered text is
  split at them and each text piece is tokenized on its own.
- Prefill always goes through ``inputs_embeds``: embed the token ids, then write
  the image embeddings into the image-slot positions in one masked assignment
  (as nanoVLM does). Without images that is exactly ``model(input_ids=...)``.
- Each sequence owns a ``DynamicCache``; :meth:`ChatModel.decode` feeds one token
  and returns the next logits. Batching across sequences comes later.

Where the vision part plugs in: pass a :class:`VisionPart` (encoder + projector,
the protocol of :mod:`assistant.engine.vision`) as ``vision=`` to
:class:`ChatModel`. ``render`` asks it how many positions an image takes
(``num_tokens(detail)``); :meth:`ChatModel.encode_images` decodes the bytes and
asks it for ``(num_images, num_tokens, hidden)`` embeddings, one call per detail
level. Nothing else changes.

The session never imports this module; it checks :attr:`ChatModel.accepts_images`
before sending images, and the engine turns :class:`PromptError` into a
``Finished(reason="error")``.
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jinja2 import TemplateError

from assistant.engine.request import ChatMessage, ImageChunk, TextChunk

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# The id written at image-slot positions; it is embedded and then overwritten, so any valid id works.
IMAGE_PLACEHOLDER_ID = 0
# A tokenizer's model_max_length above this is transformers' "unset" sentinel, not a real limit.
MAX_SANE_CONTEXT = 1 << 24


class PromptError(ValueError):
    """The messages cannot become a prompt for this model; the message is log-safe."""


class PromptTooLong(PromptError):
    """Even after dropping old messages the prompt exceeds the token budget."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(f"the prompt needs {num_tokens} tokens (system prompt and latest user message), "
                         f"but at most {max_tokens} fit in this model's context")
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class VisionPart(Protocol):
    """Image encoder + projector into the decoder's embedding space (see assistant.engine.vision)."""

    hidden_size: int

    def num_tokens(self, detail: str) -> int:
        """Positions one image takes in the prompt at this detail."""
        ...

    def encode(self, images: list[PILImage], detail: str) -> torch.Tensor:
        """Embeddings ``(num_images, num_tokens(detail), hidden_size)``."""
        ...


@dataclass(frozen=True)
class ImageSlot:
    image: ImageChunk
    num_tokens: int


Segment = tuple[int, ...] | ImageSlot


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: text token runs and image slots, in order."""

    segments: tuple[Segment, ...]
    num_dropped_messages: int = 0

    @property
    def token_ids(self) -> list[int]:
        """Token ids with :data:`IMAGE_PLACEHOLDER_ID` at image positions."""
        ids: list[int] = []
        for segment in self.segments:
            ids.extend([IMAGE_PLACEHOLDER_ID] * segment.num_tokens if isinstance(segment, ImageSlot) else segment)
        return ids

    @property
    def image_mask(self) -> list[bool]:
        """True at image-slot positions."""
        mask: list[bool] = []
        for segment in self.segments:
            if isinstance(segment, ImageSlot):
                mask.extend([True] * segment.num_tokens)
            else:
                mask.extend([False] * len(segment))
        return mask

    @property
    def images(self) -> list[ImageChunk]:
        return [s.image for s in self.segments if isinstance(s, ImageSlot)]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens if isinstance(s, ImageSlot) else len(s) for s in self.segments)

    @property
    def num_image_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments if isinstance(s, ImageSlot))


class ChatModel:
    """A decoder-only chat model and its tokenizer, ready for prefill/decode on one device."""

    def __init__(self, hf_model: Any, tokenizer: Any, *, vision: VisionPart | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use an instruct/chat model "
                             "(one whose tokenizer_config.json or chat_template.jinja defines it)")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.vision = vision
        self.device = next(hf_model.parameters()).device
        text_config = hf_model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        context = int(text_config.max_position_embeddings)
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer_limit and tokenizer_limit < MAX_SANE_CONTEXT:
            context = min(context, int(tokenizer_limit))
        self.max_context_tokens = context
        self.eos_token_ids: frozenset[int] = _eos_token_ids(hf_model, tokenizer)
        # transformers 5 renamed past_key_values to cache; accept either.
        parameters = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    @property
    def accepts_images(self) -> bool:
        return self.vision is not None

    # ------------------------------------------------------------ rendering

    def render(self, messages: Sequence[ChatMessage], max_prompt_tokens: int) -> Prompt:
        """Apply the chat template; drop the oldest turns until it fits in ``max_prompt_tokens``.

        System messages and the latest user message are always kept, and the
        kept history starts at a user message (some templates insist on
        alternation). Raises :class:`PromptTooLong` when even that does not fit.
        """
        # Positions of the non-system messages, and where the kept history may start:
        # keeping everything first, then at each later user message up to the latest one.
        history = [i for i, m in enumerate(messages) if m.role != "system"]
        cuts = [0] + [k for k, i in enumerate(history) if k > 0 and messages[i].role == "user"]

        rendered: dict[int, Prompt] = {}

        def fits(index: int) -> bool:
            if index not in rendered:
                first_kept = history[cuts[index]] if history else 0
                kept = [m for i, m in enumerate(messages) if m.role == "system" or i >= first_kept]
                rendered[index] = Prompt(self._render(kept), num_dropped_messages=cuts[index])
            return rendered[index].num_tokens <= max_prompt_tokens

        if fits(0):
            return rendered[0]
        low, high = 1, len(cuts) - 1
        if not fits(high):
            raise PromptTooLong(rendered[high].num_tokens, max_prompt_tokens)
        # Binary search for the smallest cut that fits: dropping more never needs more tokens.
        while low < high:  # invariant: cuts[high] fits, cuts[low - 1] does not
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return rendered[high]

    def _render(self, messages: Sequence[ChatMessage]) -> tuple[Segment, ...]:
        sentinel = f"<|assistant-image-{uuid.uuid4().hex}-"
        images: list[ImageChunk] = []
        conversation: list[dict[str, str]] = []
        for message in messages:
            pieces: list[str] = []
            for part in message.parts:
                if isinstance(part, TextChunk):
                    if pieces and not pieces[-1].startswith(sentinel):
                        pieces.append("\n")
                    pieces.append(part.text)
                else:
                    if self.vision is None:
                        raise PromptError("this model does not accept images")
                    pieces.append(f"{sentinel}{len(images)}|>")
                    images.append(part)
            conversation.append({"role": message.role, "content": "".join(pieces)})
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # e.g. "Conversation roles must alternate user/assistant/..."
            raise PromptError(f"the model's chat template refused the conversation: {exc}") from exc
        segments: list[Segment] = []
        # re.split with one group alternates: text, image index, text, image index, ..., text.
        for i, piece in enumerate(re.split(re.escape(sentinel) + r"(\d+)\|>", text)):
            if i % 2:
                assert self.vision is not None
                image = images[int(piece)]
                segments.append(ImageSlot(image, self.vision.num_tokens(image.detail)))
            elif piece:
                segments.append(tuple(self.tokenizer.encode(piece, add_special_tokens=False)))
        return tuple(segments)

    # ------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def embed(self, prompt: Prompt) -> torch.Tensor:
        """Input embeddings ``(1, T, C)`` of a prompt, image embeddings in the image slots."""
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=self.device)  # (1, T)
        embeds = self.hf_model.get_input_embeddings()(ids)  # (1, T, C)
        if prompt.num_image_tokens:
            image_embeds = self.encode_images(prompt.images)  # (num_image_tokens, C)
            mask = torch.tensor([prompt.image_mask], dtype=torch.bool, device=self.device)  # (1, T)
            embeds[mask] = image_embeds.to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    def encode_images(self, images: Sequence[ImageChunk]) -> torch.Tensor:
        """Embeddings of ``images`` in order, concatenated: ``(sum of num_tokens(detail), C)``.

        One ``encode`` call per detail level. (An embedding cache keyed by sha256 fits here.)
        """
        import io

        from PIL import Image

        assert self.vision is not None, "render() admits images only with a vision part"
        rows: list[torch.Tensor] = [torch.empty(0)] * len(images)
        by_detail: dict[str, list[int]] = {}
        for i, image in enumerate(images):
            by_detail.setdefault(image.detail, []).append(i)
        for detail, indices in by_detail.items():
            pixels = [Image.open(io.BytesIO(images[i].data)).convert("RGB") for i in indices]
            encoded = self.vision.encode(pixels, detail)  # (n, num_tokens(detail), C)
            expected = (len(indices), self.vision.num_tokens(detail), self.hidden_size)
            if tuple(encoded.shape) != expected:
                raise RuntimeError(f"vision part returned {tuple(encoded.shape)} for detail {detail!r}, "
                                   f"expected {expected}")
            for i, rows_of_image in zip(indices, encoded):
                rows[i] = rows_of_image  # (num_tokens(detail), C)
        return torch.cat(rows)  # (num_image_tokens, C)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.hf_model.config)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, Any]:
        """Run the whole prompt; return the last position's logits ``(vocab,)`` and the filled cache."""
        embeds = self.embed(prompt)  # (1, T, C)
        cache = self.new_cache()
        out = self.hf_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[0, -1].float(), cache  # (vocab,)

    @torch.inference_mode()
    def decode(self, token_id: int, cache: Any) -> torch.Tensor:
        """Feed one token at the next position of ``cache`` (extended in place); return logits ``(vocab,)``."""
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)  # (1, 1)
        out = self.hf_model(input_ids=ids, use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[0, -1].float()  # (vocab,)


def load_chat_model(source: str, *, dtype: str = "bfloat16", device: str = "cpu") -> ChatModel:
    """Load tokenizer + causal LM from a local directory (or a hub id, if the hub is reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'bfloat16', 'float16' or 'float32'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:
        if Path(source).expanduser().exists():
            raise RuntimeError(f"could not load the model in {source}: {exc}") from exc
        raise RuntimeError(f"could not load model {source!r}: it is not a local path, and the Hugging Face hub "
                           "is unreachable or does not have it; pass a local model directory instead") from exc
    hf_model.to(device).eval().requires_grad_(False)
    return ChatModel(hf_model, tokenizer)


def _eos_token_ids(hf_model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(hf_model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the model defines no end-of-sequence token (generation_config or tokenizer eos_token)")
    return frozenset(ids)
