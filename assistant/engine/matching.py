"""Image–text matching: how likely each text is as the answer about an image, and what the image adds.

For one image and several texts, each text is scored as the assistant's answer to a
fixed question (``prompt``, "Describe this image." by default) with the image ahead of
the question, as a conversation puts it, and without the image. By default (``scoring``
"likelihood") the score is the mean log-likelihood per token with the image; "gain" makes
it what the image added (the difference of the two), which cancels how likely a text is
on its own but, with the default model, favoured long captions of other images
(:class:`MatchScore` has the figures). Higher is a better match.

Contract:
- rendering is the serving code's (:meth:`~assistant.engine.model.ChatModel.render_pieces`):
  the same chat template, the image slot ahead of the question, the optional system
  message; the image is encoded once, through the model's embedding cache;
- a log-likelihood is the natural-log sum over the answer's own tokens (the text as
  tokenized in its turn, not the template's end-of-turn markup); both conditions
  score the same tokens, so their difference is over the same ``num_tokens``;
- texts are scored in batches of at most :data:`MAX_BATCH_TEXTS` rows per condition,
  right-padded, with logits kept only at the answer positions; batched scores equal
  one-by-one scores up to float rounding;
- :func:`score_answers` is model work: in a server it runs on the engine thread only
  (a :class:`~assistant.engine.request.ScoreRequest`). :func:`match` is the same for a
  program without a server: it validates the image as the server does and returns the
  scores best first.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from assistant.engine.model import (IMAGE_PLACEHOLDER_ID, ChatModel, ImageSlot, PromptError, PromptTooLong,
                                    embed_with_images)
from assistant.engine.request import (DEFAULT_MATCH_PROMPT, DEFAULT_SCORING, SCORINGS, ChatMessage, ImageChunk,
                                      ImageSource, InlineImages, MatchScore, TextChunk, ranking)
from assistant.images import ImageLimits, load_image

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["DEFAULT_MATCH_PROMPT", "MAX_BATCH_TEXTS", "SCORINGS", "MatchScore", "image_chunk", "match", "ranking",
           "score_answers"]

MAX_BATCH_TEXTS = 16


@dataclass(frozen=True)
class AnswerSequence:
    """One rendered conversation ending in the answer; ``answer_start:answer_end`` are the answer's positions."""

    token_ids: tuple[int, ...]  # IMAGE_PLACEHOLDER_ID at image positions
    image_mask: tuple[bool, ...]
    answer_start: int
    answer_end: int


def answer_messages(image: ImageChunk | None, prompt: str, answer: str, instructions: str) -> list[ChatMessage]:
    """``system (instructions) → user ([image,] prompt) → assistant (answer)``, as a conversation would hold it."""
    messages = [ChatMessage("system", (TextChunk(instructions),))] if instructions else []
    question: tuple[TextChunk | ImageChunk, ...] = (TextChunk(prompt),) if image is None else (image, TextChunk(prompt))
    return [*messages, ChatMessage("user", question), ChatMessage("assistant", (TextChunk(answer),))]


def render_answer(model: ChatModel, image: ImageChunk | None, prompt: str, answer: str,
                  instructions: str = "") -> AnswerSequence:
    """The conversation of :func:`answer_messages` in the model's layout, and where its answer is."""
    token_ids: list[int] = []
    image_mask: list[bool] = []
    span: tuple[int, int] | None = None
    pieces = model.render_pieces(answer_messages(image, prompt, answer, instructions), add_generation_prompt=False)
    for piece in pieces:
        if isinstance(piece, ImageSlot):
            token_ids += [IMAGE_PLACEHOLDER_ID] * piece.num_tokens
            image_mask += [True] * piece.num_tokens
            continue
        if piece.role == "assistant":
            span = (len(token_ids), len(token_ids) + len(piece.token_ids))
        token_ids += piece.token_ids
        image_mask += [False] * len(piece.token_ids)
    if span is None or span[0] == span[1]:
        raise PromptError("the chat template dropped the answer; this model cannot score texts")
    if span[0] == 0:
        raise PromptError("the chat template puts nothing ahead of the answer; this model cannot score texts")
    if len(token_ids) > model.max_context_tokens:
        raise PromptTooLong(len(token_ids), model.max_context_tokens)
    return AnswerSequence(tuple(token_ids), tuple(image_mask), *span)


@torch.inference_mode()
def answer_log_likelihoods(model: ChatModel, sequences: Sequence[AnswerSequence],
                           image_embeds: torch.Tensor | None = None) -> list[float]:
    """The log-likelihood of each sequence's answer, in one forward pass over all of them.

    ``image_embeds`` ``(num_image_tokens, C)``: the embeddings of the one image every
    sequence holds (the same image in each), or None when they hold none.
    """
    batch, length = len(sequences), max(len(s.token_ids) for s in sequences)
    token_ids = torch.full((batch, length), IMAGE_PLACEHOLDER_ID, dtype=torch.long)  # (B, T), right-padded
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
    image_mask = torch.zeros((batch, length), dtype=torch.bool)  # (B, T)
    for row, sequence in enumerate(sequences):
        n = len(sequence.token_ids)
        token_ids[row, :n] = torch.tensor(sequence.token_ids)
        attention_mask[row, :n] = 1
        image_mask[row, :n] = torch.tensor(sequence.image_mask)
    token_ids, attention_mask, image_mask = (t.to(model.device) for t in (token_ids, attention_mask, image_mask))
    if image_embeds is None:
        assert not image_mask.any(), "a sequence holds an image but no embeddings were given"
        embeds = model.hf_model.get_input_embeddings()(token_ids)  # (B, T, C)
    else:
        rows = image_embeds.repeat(batch, 1)  # (B * num_image_tokens, C): the mask fills row by row
        embeds = embed_with_images(model.hf_model, token_ids, image_mask, rows)  # (B, T, C)
    # Position p's logits predict token p + 1: keep the positions just ahead of each answer token.
    first = min(s.answer_start for s in sequences) - 1
    last = max(s.answer_end for s in sequences) - 1
    kept = torch.arange(first, last, device=model.device)  # (K,)
    logits = model.forward(has_images=image_embeds is not None, inputs_embeds=embeds, attention_mask=attention_mask,
                           use_cache=False, logits_to_keep=kept).logits  # (B, K, vocab)
    targets = token_ids[:, first + 1:last + 1]  # (B, K)
    results = []
    for row, sequence in enumerate(sequences):
        # One row at a time in float32: (K, vocab) at once, never (B, K, vocab).
        log_probs = logits[row].float().log_softmax(-1)  # (K, vocab)
        picked = log_probs.gather(-1, targets[row, :, None]).squeeze(-1)  # (K,)
        results.append(float(picked[sequence.answer_start - 1 - first:sequence.answer_end - 1 - first].sum()))
    return results


def score_answers(model: ChatModel, image: ImageChunk, texts: Sequence[str], prompt: str = DEFAULT_MATCH_PROMPT,
                  instructions: str = "", *, source: ImageSource,
                  scoring: str = DEFAULT_SCORING) -> tuple[MatchScore, ...]:
    """One :class:`MatchScore` per text, in the texts' order (model work: the engine thread's, in a server).

    ``source`` has the image's bytes, fetched only when the embedding cache misses.

    Raises :class:`~assistant.engine.model.PromptError` for a model without a vision
    part, an empty text or prompt or an unknown scoring, :class:`~assistant.engine.model.PromptTooLong`
    when a conversation exceeds the model's context.
    """
    if not model.accepts_images:
        raise PromptError("this model does not accept images")
    if not prompt or not all(texts):
        raise PromptError("the prompt and every text must be non-empty")
    if scoring not in SCORINGS:
        raise PromptError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    image_embeds, _ = model.encode_images([image], source)  # (num_image_tokens, C), from the cache when it has them
    scores: list[MatchScore] = []
    for start in range(0, len(texts), MAX_BATCH_TEXTS):
        chunk = texts[start:start + MAX_BATCH_TEXTS]
        with_image = [render_answer(model, image, prompt, text, instructions) for text in chunk]
        without_image = [render_answer(model, None, prompt, text, instructions) for text in chunk]
        likelihoods = answer_log_likelihoods(model, with_image, image_embeds)
        likelihoods_without = answer_log_likelihoods(model, without_image)
        for offset, text in enumerate(chunk):
            num_tokens = with_image[offset].answer_end - with_image[offset].answer_start
            assert num_tokens == without_image[offset].answer_end - without_image[offset].answer_start
            scores.append(MatchScore(start + offset, text, likelihoods[offset], likelihoods_without[offset],
                                     num_tokens, scoring))
    return tuple(scores)


def image_chunk(image: PILImage | bytes, detail: str = "auto",
                limits: ImageLimits | None = None) -> tuple[ImageChunk, InlineImages]:
    """An image file's bytes (PNG, JPEG, WebP, GIF) or a PIL image, validated as the server validates images:
    its reference, and the source that holds its (stored form's) bytes.

    Raises :class:`~assistant.errors.ImageRejected` with the server's codes (param ``image``).
    """
    if not isinstance(image, bytes):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        image = buffer.getvalue()
    stored, _ = load_image(image, limits or ImageLimits(), param="image")
    sha256 = hashlib.sha256(stored.data).hexdigest()
    return ImageChunk(sha256, detail), InlineImages({sha256: stored.data})  # type: ignore[arg-type]


def match(model: ChatModel, image: PILImage | bytes, texts: Sequence[str], prompt: str = DEFAULT_MATCH_PROMPT, *,
          instructions: str | None = None, detail: str = "auto",
          scoring: str = DEFAULT_SCORING) -> list[MatchScore]:
    """Score ``texts`` against ``image`` (see the module docstring); best match first.

    ``instructions``: the system message; None sends what ``assistant serve`` sends by
    default (``prompts/system.txt``, the prompt training renders with), "" none.
    ``scoring``: what :attr:`MatchScore.score` is, one of :data:`SCORINGS` (see the module docstring).
    Each :class:`MatchScore` keeps its text's ``index`` in ``texts``.
    Raises ``ValueError`` for a model without a vision part, an empty text or an unknown scoring;
    :class:`~assistant.errors.ImageRejected` for an image the server would refuse.
    """
    from assistant.prompts import load_system_prompt

    if not model.accepts_images:
        raise ValueError("this model has no vision part; image-text matching needs a vision model")
    if not texts or not all(texts) or not prompt:
        raise ValueError("give at least one text; the prompt and every text must be non-empty")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    chunk, source = image_chunk(image, detail)
    scores = score_answers(model, chunk, list(texts), prompt,
                           load_system_prompt() if instructions is None else instructions, source=source,
                           scoring=scoring)
    return [scores[index] for index in ranking(scores)]
