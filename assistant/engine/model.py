"""The chat model: tokenizer + decoder (+ an optional vision part), rendered prompts, prefill and decode.

Contract:
- :meth:`ChatModel.render` turns chat messages into a :class:`Prompt`, a sequence
  of segments: runs of text token ids and :class:`ImageSlot` s (one per image,
  ``num_tokens`` positions long). The tokenizer's own chat template decides the
  text; images are rendered as unique sentinel strings, the rendered text is
  split at them and each text piece is tokenized on its own. The sentinel takes
  the place of the template's own image markup (LLaVA's ``<image>``), so one
  code path serves every template.
- Message content goes to the template as a string, unless the template reads
  only typed parts: llava-hf templates iterate ``message['content']`` items of
  type ``"text"``/``"image"``, and render a plain string as nothing, without an
  error (a string iterates as characters, none with a ``type``). So
  :func:`template_content_format` renders a probe message both ways once, at
  construction, and keeps the shape in which the probe shows up; with ``"list"``
  each message becomes one text part ``[{"type": "text", "text": ...}]`` with
  the image sentinels inside it.
- Prefill always goes through ``inputs_embeds``: embed the token ids, then write
  the image embeddings into the image-slot positions in one masked assignment
  (as nanoVLM does). Without images that is exactly ``model(input_ids=...)``.
- A prefill fills a ``DynamicCache`` of its own; the engine then decodes running
  sequences together (:mod:`assistant.engine.batch`, :meth:`ChatModel.decode_batch`);
  :meth:`ChatModel.decode` feeds one token to one sequence's cache. Both take the lean
  step of :mod:`assistant.engine.fast_decode` where it applies (Llama-family decoders,
  float, int8-cpu or int4-cpu layers, the image adapter included), transformers'
  forward elsewhere.
- A vision model's LoRA adapter (what ``assistant train finetune`` trains, on
  conversations with images only) is kept as separate layers and switched per
  forward pass (:meth:`ChatModel.forward`): on for a sequence whose prompt holds
  an image, off otherwise, so a text-only conversation gets exactly the decoder's
  answers.

Where the vision part plugs in: pass a :class:`~assistant.engine.vision.VisionPart`
(encoder + projector) as ``vision=`` and an
:class:`~assistant.engine.cache.EmbeddingCache` as ``image_cache=``. ``render``
asks the part how many positions an image takes (``num_tokens(detail)``);
:meth:`ChatModel.encode_images` looks each image up by (vision identity, image
sha256, preprocess key), fetches the bytes of the misses only, in one call of the
request's :data:`~assistant.engine.request.ImageSource`, decodes them (EXIF
orientation applied, RGB; see :func:`assistant.images.decode_stored`) and
encodes them, one ``encode`` call per detail level, and says how many image
tokens were served from the cache. So an image is encoded once, not again on later turns of its
conversation nor when another conversation sends the same bytes. Without an
``image_cache`` (or with a zero-byte one) every image is encoded each time.

Loading (``from_pretrained``, quantization, which kind of model ``--model``
names) lives in :mod:`assistant.engine.loader`.

The session never imports this module; it checks :attr:`ChatModel.accepts_images`
before sending images and uses :meth:`ChatModel.num_image_tokens` for image-token
budgets, and the engine turns :class:`PromptError` into a ``Finished(reason="error")``.

Rendering runs where the engine admits a request (the caller's thread, never the
engine thread): :meth:`ChatModel.for_rendering` gives the admission its own copy
of the tokenizer, so it never shares the Rust tokenizer with the engine thread's
detokenizing.
"""

from __future__ import annotations

import copy
import inspect
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from jinja2 import TemplateError

from assistant.engine.cache import EmbeddingCache, cache_key, encode_cached
from assistant.engine.fast_decode import FastDecoder
from assistant.engine.request import ChatMessage, ImageChunk, ImageSource, TextChunk
from assistant.engine.vision import VisionPart
from assistant.images import decode_stored
from assistant.tool_calls import TAG as TOOL_CALL_TAG

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ContentFormat = Literal["string", "list"]

# The id written at image-slot positions; it is embedded and then overwritten, so any valid id works.
IMAGE_PLACEHOLDER_ID = 0
# No tokenizer averages more characters per token than this over a whole message (BPE on
# English text averages about 4); it bounds how much history is worth rendering.
MAX_CHARS_PER_TOKEN = 16
# A tokenizer's model_max_length above this is transformers' "unset" sentinel, not a real limit.
MAX_SANE_CONTEXT = 1 << 24


class PromptError(ValueError):
    """The messages cannot become a prompt for this model; the message is log-safe."""


class ImageGone(PromptError):
    """An image the prompt needs is no longer stored (its item was deleted while the request waited)."""


class PromptTooLong(PromptError):
    """Even after dropping old messages the prompt exceeds the token budget."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(f"the prompt needs {num_tokens} tokens (system prompt and latest user message), "
                         f"but at most {max_tokens} fit in this model's context")
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


@dataclass(frozen=True)
class ImageSlot:
    image: ImageChunk
    num_tokens: int


Segment = tuple[int, ...] | ImageSlot


@dataclass(frozen=True)
class TextRun:
    """Tokens of one rendered piece of text: one message's own text (``role`` set), or template markup (None)."""

    token_ids: tuple[int, ...]
    role: str | None = None


Piece = TextRun | ImageSlot


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

    def splits_image(self, position: int) -> bool:
        """Whether ``position`` lies inside an image slot, after its first position."""
        offset = 0
        for segment in self.segments:
            length = segment.num_tokens if isinstance(segment, ImageSlot) else len(segment)
            if offset < position < offset + length:
                return isinstance(segment, ImageSlot)
            offset += length
        return False

    def images_from(self, start: int) -> list[ImageChunk]:
        """The images whose slots begin at position ``start`` or later."""
        images, position = [], 0
        for segment in self.segments:
            if isinstance(segment, ImageSlot):
                if position >= start:
                    images.append(segment.image)
                position += segment.num_tokens
            else:
                position += len(segment)
        return images

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens if isinstance(s, ImageSlot) else len(s) for s in self.segments)

    @property
    def num_image_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments if isinstance(s, ImageSlot))


class ChatModel:
    """A decoder-only chat model and its tokenizer, ready for prefill/decode on one device."""

    def __init__(self, hf_model: Any, tokenizer: Any, *, vision: VisionPart | None = None,
                 image_cache: EmbeddingCache | None = None, fast_decode: bool = True) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use an instruct/chat model "
                             "(one whose tokenizer_config.json or chat_template.jinja defines it)")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.vision = vision
        # A zero-byte cache keeps nothing: every image is encoded each time it is used.
        self.image_cache = image_cache if image_cache is not None else EmbeddingCache(0)
        self.device = next(hf_model.parameters()).device
        text_config = hf_model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        if vision is not None and vision.hidden_size != self.hidden_size:
            raise ValueError(f"the vision part gives embeddings of width {vision.hidden_size}, but the decoder's "
                             f"hidden size is {self.hidden_size}; the projector must map to the decoder's width")
        self.content_format = template_content_format(tokenizer)
        context = int(text_config.max_position_embeddings)
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer_limit and tokenizer_limit < MAX_SANE_CONTEXT:
            context = min(context, int(tokenizer_limit))
        self.max_context_tokens = context
        self.eos_token_ids: frozenset[int] = _eos_token_ids(hf_model, tokenizer)
        # transformers 5 renamed past_key_values to cache; accept either.
        parameters = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        # A vision model's LoRA adapter was trained on conversations with images only: it is switched on for
        # those and off for the rest, which the decoder answers exactly as it would without the vision part.
        self._image_adapter_layers = lora_layers(hf_model) if vision is not None else []
        self._is_adapter_on = True  # peft's initial state
        # The lean decode step where it applies (None elsewhere: transformers' forward decodes then).
        self.fast_decoder = FastDecoder.for_model(hf_model) if fast_decode else None
        self._empty_cache: Any = None  # new_cache copies it; built at the first call

    @property
    def has_image_adapter(self) -> bool:
        return bool(self._image_adapter_layers)

    def forward(self, *, has_images: bool, **inputs: Any) -> Any:
        """``hf_model(**inputs)``, with the image adapter (if any) on exactly when the sequence holds an image."""
        if self._image_adapter_layers and has_images != self._is_adapter_on:
            for layer in self._image_adapter_layers:
                layer.enable_adapters(has_images)
            self._is_adapter_on = has_images
        return self.hf_model(**inputs)

    @property
    def accepts_images(self) -> bool:
        return self.vision is not None

    def num_image_tokens(self, detail: str) -> int:
        """Positions one image takes in a prompt at ``detail``; what image-token budgets count."""
        if self.vision is None:
            raise ValueError("this model has no vision part; it takes no images")
        return self.vision.num_tokens(detail)

    def for_rendering(self) -> ChatModel:
        """This model with its own copy of the tokenizer, for rendering prompts on another thread than the one
        that detokenizes (the forward-pass state is shared; call no forward pass on the copy)."""
        clone = copy.copy(self)
        clone.tokenizer = copy.deepcopy(self.tokenizer)
        return clone

    # ------------------------------------------------------------ rendering

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template describes function tools itself, in the format of
        :mod:`assistant.tool_calls` (Hermes: Qwen 2.5, Hermes, ...); then a request's ``tools`` go to it."""
        template = self.tokenizer.chat_template
        return isinstance(template, str) and "tools" in template and TOOL_CALL_TAG in template

    def render(self, messages: Sequence[ChatMessage], max_prompt_tokens: int,
               tools: Sequence[Mapping[str, Any]] = ()) -> Prompt:
        """Apply the chat template (with ``tools``, for a template that :attr:`renders_tools`); drop the oldest
        turns until it fits in ``max_prompt_tokens``.

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
                rendered[index] = Prompt(self._render(kept, tools), num_dropped_messages=cuts[index])
            return rendered[index].num_tokens <= max_prompt_tokens

        # Rendering costs time in proportion to the text, on the engine thread: skip, unrendered,
        # the cuts that cannot fit even at MAX_CHARS_PER_TOKEN characters a token.
        first_possible = self._first_possible_cut(messages, history, cuts, max_prompt_tokens)
        if first_possible == 0 and fits(0):
            return rendered[0]
        low, high = max(1, first_possible), len(cuts) - 1
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

    def _first_possible_cut(self, messages: Sequence[ChatMessage], history: list[int], cuts: list[int],
                            max_prompt_tokens: int) -> int:
        """The first cut whose kept messages might fit, by a lower bound on their tokens (no tokenizing)."""
        def min_tokens(message: ChatMessage) -> int:
            return sum(len(p.text) // MAX_CHARS_PER_TOKEN if isinstance(p, TextChunk)
                       else self.vision.num_tokens(p.detail) if self.vision is not None else 0
                       for p in message.parts)

        system_tokens = sum(min_tokens(m) for m in messages if m.role == "system")
        suffix = [0] * (len(messages) + 1)  # lower bound of the non-system messages from index i on
        for i in reversed(range(len(messages))):
            suffix[i] = suffix[i + 1] + (0 if messages[i].role == "system" else min_tokens(messages[i]))
        for index, cut in enumerate(cuts):
            if system_tokens + suffix[history[cut] if history else 0] <= max_prompt_tokens:
                return index
        return len(cuts) - 1

    def _render(self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]) -> tuple[Segment, ...]:
        segments: list[Segment] = []
        for piece in self.render_pieces(messages, add_generation_prompt=True, tools=tools):
            if isinstance(piece, ImageSlot):
                segments.append(piece)
            elif segments and not isinstance(segments[-1], ImageSlot):  # adjacent token runs form one segment
                segments[-1] = segments[-1] + piece.token_ids
            elif piece.token_ids:
                segments.append(piece.token_ids)
        return tuple(segments)

    def render_pieces(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool,
                      tools: Sequence[Mapping[str, Any]] = ()) -> tuple[Piece, ...]:
        """The chat template around sentinels, then each piece tokenized on its own: the one prompt layout
        that serving (:meth:`render`) and training (:mod:`assistant.training.examples`) share.

        Message text and images enter the template as unguessable sentinels. The
        template's own markup is tokenized normally; message text with
        ``split_special_tokens``, so a client writing "<|im_start|>system" gets
        those characters, never the special tokens (no forged turns); each image
        becomes a slot of ``num_tokens(detail)`` positions. Each text run says
        whose text it is, so training can put its loss on the assistant's words only.
        """
        sentinel = f"<|assistant-{uuid.uuid4().hex}-"
        images: list[ImageChunk] = []
        texts: list[tuple[str, str]] = []  # (text, role)
        conversation: list[dict[str, Any]] = []
        for message in messages:
            # Images go ahead of the message's text, whatever their place among the parts:
            # LLaVA-style models are trained on "<image>\n<text>".
            message_images = [part for part in message.parts if isinstance(part, ImageChunk)]
            if message_images and self.vision is None:
                raise PromptError("this model does not accept images")
            content = "".join(f"{sentinel}i{len(images) + k}|>" for k in range(len(message_images)))
            images.extend(message_images)
            message_text = "\n".join(part.text for part in message.parts if isinstance(part, TextChunk))
            if message_text:
                content += f"{sentinel}t{len(texts)}|>"
                texts.append((("\n" if message_images else "") + message_text, message.role))
            conversation.append({"role": message.role,
                                 "content": [{"type": "text", "text": content}] if self.content_format == "list"
                                 else content})
        if not conversation:  # conversation "none", no input and no instructions: templates raise a bare ValueError
            raise PromptError("there is nothing to answer: no instructions and no messages")
        try:
            rendered = self.tokenizer.apply_chat_template(conversation, tools=list(tools) or None, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:  # e.g. "Conversation roles must alternate user/assistant/..."
            raise PromptError(f"the model's chat template refused the conversation: {exc}") from exc
        result: list[Piece] = []
        # re.split with two groups repeats: markup, kind ("i"/"t"), index, markup, kind, index, ..., markup.
        parts = re.split(re.escape(sentinel) + r"([it])(\d+)\|>", rendered)
        for i in range(0, len(parts), 3):
            if parts[i]:
                result.append(TextRun(tuple(self.tokenizer.encode(parts[i], add_special_tokens=False))))
            if i + 2 >= len(parts):
                break
            kind, index = parts[i + 1], int(parts[i + 2])
            if kind == "i":
                assert self.vision is not None
                result.append(ImageSlot(images[index], self.vision.num_tokens(images[index].detail)))
            else:
                text, role = texts[index]
                result.append(TextRun(tuple(self.tokenizer.encode(text, add_special_tokens=False,
                                                                  split_special_tokens=True)), role))
        return tuple(result)

    # ------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def embed(self, prompt: Prompt, image_embeds: torch.Tensor | None = None, start: int = 0,
              end: int | None = None) -> torch.Tensor:
        """Input embeddings ``(1, end - start, C)`` of a prompt's positions ``start`` to ``end`` (default: its
        end; a start inside an image slot is refused), image embeddings in the image slots.

        ``image_embeds`` ``(image tokens in those positions, C)``: what :meth:`encode_images`
        returned for the images whose slots they hold (``prompt.images_from(start)`` when
        ``end`` is the prompt's end); required when those positions hold an image.
        """
        ids = torch.tensor([prompt.token_ids[start:end]], dtype=torch.long, device=self.device)  # (1, T')
        image_mask = prompt.image_mask[start:end]
        if not any(image_mask):
            return self.hf_model.get_input_embeddings()(ids)  # (1, T', C)
        if prompt.splits_image(start):
            raise ValueError(f"position {start} is inside an image slot")
        if image_embeds is None:
            raise ValueError("the prompt holds images: pass their embeddings (encode_images)")
        mask = torch.tensor([image_mask], dtype=torch.bool, device=self.device)  # (1, T')
        return embed_with_images(self.hf_model, ids, mask, image_embeds)

    def encode_images(self, images: Sequence[ImageChunk], source: ImageSource) -> tuple[torch.Tensor, int]:
        """Embeddings of ``images`` in order, concatenated ``(sum of num_tokens(detail), C)``, and how many of
        those rows were served from the image cache.

        Only cache misses are fetched from ``source`` (one call), decoded and encoded, one ``encode`` call per
        detail level. Raises :class:`ImageGone` when the source no longer has one of them.
        """
        if not images:
            return torch.empty(0, self.hidden_size, device=self.device), 0
        if self.vision is None:
            raise PromptError("this model does not accept images")

        def load(sha256s: Sequence[str]) -> dict[str, PILImage]:
            stored = source(sha256s)
            missing = [sha256 for sha256 in sha256s if sha256 not in stored]
            if missing:
                raise ImageGone(f"image {missing[0]} is no longer stored; it was deleted with its item")
            return {sha256: decode_stored(stored[sha256]) for sha256 in sha256s}

        rows, hits = encode_cached(self.vision, self.image_cache, [(image.sha256, image.detail) for image in images],
                                   load)
        for image, row in zip(images, rows, strict=True):
            expected = (self.vision.num_tokens(image.detail), self.hidden_size)
            if tuple(row.shape) != expected:
                raise RuntimeError(f"vision part returned {tuple(row.shape)} per image for detail {image.detail!r}, "
                                   f"expected {expected}")
        num_cached_tokens = sum(row.shape[0] for row, is_hit in zip(rows, hits, strict=True) if is_hit)
        return torch.cat(rows), num_cached_tokens  # (num_image_tokens, C)

    def has_embeddings(self, images: Sequence[ImageChunk]) -> bool:
        """Whether every one of ``images`` has its embeddings in the image cache already (an :meth:`encode_images`
        of them would encode nothing)."""
        vision = self.vision
        return not images or (vision is not None and all(cache_key(vision, image.sha256, image.detail)
                                                         in self.image_cache for image in images))

    def new_cache(self) -> Any:
        """An empty transformers cache for this model: a copy of one built from its config once (building one reads
        the config's layer types each time: 0.67 ms on SmolLM2-135M against 0.14 for the copy, and a conversation
        makes several, at its start and end, on the engine thread)."""
        if self._empty_cache is None:
            from transformers import DynamicCache

            self._empty_cache = DynamicCache(config=self.hf_model.config)
        return copy.deepcopy(self._empty_cache)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, image_embeds: torch.Tensor | None = None, *, cache: Any = None,
                start: int = 0, end: int | None = None) -> tuple[torch.Tensor, Any]:
        """Run the prompt's positions ``start`` to ``end`` (default: all of it); return the last one's logits
        ``(vocab,)`` and the filled cache.

        ``cache``, when given, already holds the prompt's first ``start`` positions (a
        reused prefix, :mod:`assistant.engine.prefix_cache`, or the chunks of a chunked
        prefill run so far). ``image_embeds`` as for :meth:`embed`.
        """
        if start and (cache is None or cache.get_seq_length() != start):
            raise ValueError(f"a prefill from position {start} needs a cache holding exactly {start} positions")
        embeds = self.embed(prompt, image_embeds, start, end)  # (1, end - start, C)
        cache = cache if cache is not None else self.new_cache()
        out = self.forward(has_images=bool(prompt.images), inputs_embeds=embeds, use_cache=True, logits_to_keep=1,
                           **{self._cache_kwarg: cache})
        return out.logits[0, -1].float(), cache  # (vocab,)

    @torch.inference_mode()
    def prefill_batch(self, chunks: Sequence[tuple[Prompt, int, int, Any]], *,
                      has_images: bool) -> tuple[torch.Tensor, list[Any]]:
        """Several prompts' positions in one forward pass: ``chunks`` holds ``(prompt, start, end, cache)`` for
        each, as :meth:`prefill` takes them (``cache`` holding exactly ``start`` positions, or None when
        ``start`` is 0), and none of those positions may be an image slot (their embeddings would have to be
        passed). ``has_images``: whether the prompts hold images (all alike; it switches the image adapter).
        Returns each one's last logits ``(len(chunks), vocab)`` and each one's filled cache (batch size 1).

        The rows are laid side by side: each cache right-aligned to the longest, each chunk right-aligned to the
        longest after it, and a 4-d mask lets a position see only its own row's positions before it (the gaps
        between a short cache and a short chunk are nobody's). A padding query sees only itself, so that no row
        of attention is empty. Each row's positions are its own (rotary embedding as alone), so a row computes
        what it would alone, up to the order of sums.
        """
        device = self.device
        lengths = [end - start for _, start, end, _ in chunks]
        cached = [start for _, start, _, _ in chunks]
        for (prompt, start, end, cache), length in zip(chunks, lengths, strict=True):
            if length < 1 or any(prompt.image_mask[start:end]):
                raise ValueError("prefill_batch takes chunks of one position or more, without image slots")
            if (cache.get_seq_length() if cache is not None else 0) != start:
                raise ValueError(f"a prefill from position {start} needs a cache holding exactly {start} positions")
        width, past = max(lengths), max(cached)
        ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)  # (B, T), 0 on the left padding
        positions = torch.zeros((len(chunks), width), dtype=torch.long, device=device)  # (B, T)
        visible = torch.zeros((len(chunks), past + width), dtype=torch.bool, device=device)  # (B, L + T)
        for row, ((prompt, start, end, _), length) in enumerate(zip(chunks, lengths, strict=True)):
            ids[row, width - length:] = torch.tensor(prompt.token_ids[start:end], dtype=torch.long)
            positions[row, width - length:] = torch.arange(start, end)
            visible[row, past - start:past] = True
            visible[row, past + width - length:] = True
        causal = torch.ones((width, past + width), dtype=torch.bool, device=device).tril(past)  # (T, L + T)
        allowed = causal[None] & visible[:, None, :]  # (B, T, L + T)
        padding = torch.arange(width, device=device)[None] < (width - torch.tensor(lengths, device=device))[:, None]
        allowed[:, torch.arange(width), past + torch.arange(width)] |= padding  # a padding query sees itself
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        batch_cache = _side_by_side(self.new_cache, [cache for _, _, _, cache in chunks], cached, past)
        out = self.forward(has_images=has_images, input_ids=ids, position_ids=positions, attention_mask=mask[:, None],
                           use_cache=True, logits_to_keep=1, **{self._cache_kwarg: batch_cache})
        caches = [_own_positions(batch_cache, self.new_cache, row, past, start, width, length)
                  for row, (start, length) in enumerate(zip(cached, lengths, strict=True))]
        return out.logits[:, -1].float(), caches  # (B, vocab)

    def _decodes_fast(self, has_images: bool) -> bool:
        """Whether the lean step decodes a sequence: it exists here, and runs the image adapter if the sequence
        needs it on."""
        if self.fast_decoder is None:
            return False
        return not self._adapter_on_for(has_images) or self.fast_decoder.runs_adapter

    def _adapter_on_for(self, has_images: bool) -> bool:
        return has_images and bool(self._image_adapter_layers)

    @torch.inference_mode()
    def decode(self, token_id: int, cache: Any, *, has_images: bool) -> torch.Tensor:
        """Feed one token at the next position of ``cache`` (extended in place); return logits ``(vocab,)``.
        ``has_images``: whether the sequence's prompt holds an image (as given to :meth:`prefill`)."""
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)  # (1, 1)
        if self._decodes_fast(has_images):
            position = torch.tensor([[cache.get_seq_length()]], dtype=torch.long, device=self.device)  # (1, 1)
            return self.fast_decoder.step(ids, position, None, cache, reserve=False,  # type: ignore[union-attr]
                                          adapter=self._adapter_on_for(has_images))[0]
        out = self.forward(has_images=has_images, input_ids=ids, use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[0, -1].float()  # (vocab,)


    @torch.inference_mode()
    def decode_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
                     cache: Any, *, has_images: bool) -> torch.Tensor:
        """One token for each row of a batched cache (:class:`~assistant.engine.batch.DecodeBatch`):
        ``token_ids`` and ``positions`` ``(B, 1)``, ``attention_mask`` ``(B, L + 1)`` (0 on left padding);
        returns logits ``(B, vocab)``."""
        if self._decodes_fast(has_images):
            mask = None if bool(attention_mask.all()) else attention_mask
            return self.fast_decoder.step(token_ids, positions, mask, cache,  # type: ignore[union-attr]
                                          adapter=self._adapter_on_for(has_images))
        out = self.forward(has_images=has_images, input_ids=token_ids, position_ids=positions,
                           attention_mask=attention_mask, use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[:, -1].float()  # (B, vocab)


def _side_by_side(new_cache: Callable[[], Any], caches: Sequence[Any], lengths: Sequence[int], width: int) -> Any:
    """One cache of ``len(caches)`` rows, each of ``caches`` (batch size 1, ``lengths`` positions; None for
    none) right-aligned to ``width`` positions, zeros on the left."""
    batch = new_cache()
    if not width:
        return batch
    template = next(cache for cache in caches if cache is not None)
    for index, layer in enumerate(template.layers):
        keys, values = [], []
        for cache, length in zip(caches, lengths, strict=True):
            own = cache.layers[index] if cache is not None else None
            keys.append(F.pad(own.keys if own is not None else layer.keys[:, :, :0], (0, 0, width - length, 0)))
            values.append(F.pad(own.values if own is not None else layer.values[:, :, :0], (0, 0, width - length, 0)))
        batch.update(torch.cat(keys), torch.cat(values), index)  # (B, H, width, D) each
    return batch


def _own_positions(batch: Any, new_cache: Callable[[], Any], row: int, past: int, start: int, width: int,
                   length: int) -> Any:
    """Row ``row``'s own cache (batch size 1) out of :meth:`ChatModel.prefill_batch`'s: its ``start`` cached
    positions, right-aligned to ``past``, then its ``length`` new ones, right-aligned to ``past + width``."""
    own = new_cache()
    for index, layer in enumerate(batch.layers):
        own.update(torch.cat([layer.keys[row:row + 1, :, past - start:past],
                              layer.keys[row:row + 1, :, past + width - length:]], dim=2),
                   torch.cat([layer.values[row:row + 1, :, past - start:past],
                              layer.values[row:row + 1, :, past + width - length:]], dim=2), index)
    return own


def embed_with_images(hf_model: Any, token_ids: torch.Tensor, image_mask: torch.Tensor,
                      image_embeds: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``(B, T, C)`` of ``token_ids`` ``(B, T)``, with the rows of ``image_embeds``
    ``(num_image_tokens, C)`` written, in order, where ``image_mask`` ``(B, T)`` is True: one masked
    assignment. Differentiable in ``image_embeds`` (training backpropagates through it into the projector)."""
    embeds = hf_model.get_input_embeddings()(token_ids)  # (B, T, C)
    embeds[image_mask] = image_embeds.to(device=embeds.device, dtype=embeds.dtype)
    return embeds


def lora_layers(hf_model: Any) -> list[Any]:
    """The peft LoRA layers inside ``hf_model`` (none without an adapter)."""
    if not any("lora_" in name for name, _ in hf_model.named_modules()):
        return []  # no adapter: peft is not imported
    from peft.tuners.lora import LoraLayer

    return [module for module in hf_model.modules() if isinstance(module, LoraLayer)]


def template_content_format(tokenizer: Any) -> ContentFormat:
    """How the tokenizer's chat template reads message content: a ``"string"``, or a ``"list"`` of typed parts.

    A probe message is rendered as a string first, then as one text part; the
    first shape in which the probe shows up wins. A template that shows it in
    neither (one that rewrites content) keeps the string shape.
    """
    probe = f"assistant-probe-{uuid.uuid4().hex}"
    for content_format, content in (("string", probe), ("list", [{"type": "text", "text": probe}])):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # any failure only means that this template does not read that shape
            continue
        if isinstance(text, str) and probe in text:
            return content_format  # type: ignore[return-value]
    return "string"


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
