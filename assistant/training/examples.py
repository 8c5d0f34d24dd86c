"""LLaVA examples → training sequences (token ids, labels, image slots) in exactly the layout serving uses.

A sequence is the conversation ``system → user (image, question) → assistant
(answer) → user (question) → ...`` rendered by
:meth:`~assistant.engine.model.ChatModel.render_pieces`, the code that renders
prompts for ``assistant serve``: the same chat template, the image slot ahead of
the first question's text, each piece tokenized the same way. The system message
is the one ``assistant serve`` sends by default (``prompts/system.txt``, or
``--system-prompt-file``), so a trained model sees at serving time the prompt it
was trained on.

Labels are the token ids of the assistant's text, followed by the token that ends
the answer when the template puts an end-of-sequence token right after it (so the
model learns where an answer stops: generation stops at that token), and
:data:`IGNORE_INDEX` everywhere else: the system prompt, the questions, the
template's markup and the image slots.

Every image is encoded at :data:`TRAIN_DETAIL`; its slot holds
``num_tokens(TRAIN_DETAIL)`` positions. Bad data never stops a run: each entry
that cannot become a sequence (what :func:`~assistant.data.llava.read_llava`
reports, an image that cannot be read, a conversation longer than the model's
context) becomes a :class:`~assistant.data.llava.DataProblem` and is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from assistant.data.llava import DataProblem, Example, read_llava
from assistant.engine.model import IMAGE_PLACEHOLDER_ID, ChatModel, ImageSlot, PromptError
from assistant.engine.request import ChatMessage, ImageChunk, TextChunk

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's cross_entropy default)
TRAIN_DETAIL = "high"
MAX_HELDOUT_IMAGES = 64  # the held-out split taken from the training data: at most this many images ...
HELDOUT_SHARE = 20  # ... and at most one in this many


@dataclass(frozen=True)
class TrainingSequence:
    token_ids: tuple[int, ...]  # IMAGE_PLACEHOLDER_ID at image positions
    labels: tuple[int, ...]  # IGNORE_INDEX except on the answers
    image_mask: tuple[bool, ...]  # True at image positions
    image_sha256: str  # of the image file's bytes: the feature cache key
    image_path: Path
    location: str  # "captions.json entry 3"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Batch:
    token_ids: torch.Tensor  # (B, T) long, right-padded
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on padding
    attention_mask: torch.Tensor  # (B, T) long, 0 on padding
    image_mask: torch.Tensor  # (B, T) bool
    image_sha256s: tuple[str, ...]  # one per sequence, in order: the image rows fill the mask row-major

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def conversation(example: Example, image_sha256: str, system_prompt: str) -> list[ChatMessage]:
    """The chat messages of ``example``, as the session would build them for ``assistant serve``."""
    # Rendering reads only the image's detail; the bytes stay on disk (the feature cache has the features).
    image = ImageChunk(sha256=image_sha256, detail=TRAIN_DETAIL)
    messages = [ChatMessage("system", (TextChunk(system_prompt),))] if system_prompt else []
    for number, (question, answer) in enumerate(example.turns):
        parts: tuple[TextChunk | ImageChunk, ...] = (TextChunk(question),) if question else ()
        messages.append(ChatMessage("user", (image, *parts) if number == 0 else parts))
        messages.append(ChatMessage("assistant", (TextChunk(answer),)))
    return messages


def build_sequence(model: ChatModel, example: Example, image_sha256: str, system_prompt: str) -> TrainingSequence:
    """Render ``example`` with the model's own rendering and label its answers (see the module docstring)."""
    pieces = model.render_pieces(conversation(example, image_sha256, system_prompt), add_generation_prompt=False)
    token_ids: list[int] = []
    labels: list[int] = []
    image_mask: list[bool] = []
    is_after_answer = False
    for piece in pieces:
        if isinstance(piece, ImageSlot):
            token_ids += [IMAGE_PLACEHOLDER_ID] * piece.num_tokens
            labels += [IGNORE_INDEX] * piece.num_tokens
            image_mask += [True] * piece.num_tokens
            is_after_answer = False
            continue
        ids = list(piece.token_ids)
        if piece.role == "assistant":
            piece_labels = list(ids)
        else:
            piece_labels = [IGNORE_INDEX] * len(ids)
            if is_after_answer and ids and ids[0] in model.eos_token_ids:
                piece_labels[0] = ids[0]  # the answer's end: "<|im_end|>" in ChatML
        is_after_answer = piece.role == "assistant"
        token_ids += ids
        labels += piece_labels
        image_mask += [False] * len(ids)
    return TrainingSequence(tuple(token_ids), tuple(labels), tuple(image_mask), image_sha256, example.image,
                            example.location)


def read_examples(paths: Iterable[Path]) -> tuple[list[Example], list[DataProblem]]:
    """The usable entries of the LLaVA files at ``paths``, and the problems of the others.

    Raises :class:`~assistant.data.llava.DataError` when a file cannot be read at
    all or has no usable entry: that is refused before anything is loaded.
    """
    examples: list[Example] = []
    problems: list[DataProblem] = []
    for path in paths:
        file_examples, file_problems = read_llava(path)
        examples += file_examples
        problems += file_problems
    return examples, problems


def build_sequences(examples: Iterable[Example], model: ChatModel,
                    system_prompt: str) -> tuple[list[TrainingSequence], list[DataProblem]]:
    """Each example as a sequence, except those whose image cannot be read or that exceed the model's context."""
    sequences: list[TrainingSequence] = []
    problems: list[DataProblem] = []
    hashes: dict[Path, str] = {}
    for example in examples:
        try:
            if example.image not in hashes:
                hashes[example.image] = hashlib.sha256(example.image.read_bytes()).hexdigest()
            sequence = build_sequence(model, example, hashes[example.image], system_prompt)
        except OSError as exc:
            problems.append(DataProblem(example.location, f"image {example.image} cannot be read: {exc}"))
            continue
        except PromptError as exc:
            problems.append(DataProblem(example.location, str(exc)))
            continue
        if sequence.num_tokens > model.max_context_tokens:
            problems.append(DataProblem(example.location, f"the conversation takes {sequence.num_tokens} "
                                        f"tokens; the model's context holds {model.max_context_tokens}"))
            continue
        sequences.append(sequence)
    return sequences, problems


def split_heldout(sequences: list[TrainingSequence]) -> tuple[list[TrainingSequence], list[TrainingSequence]]:
    """(train, held out): a fixed split by image, the same whatever the seed or the order of the files.

    The held-out images are those with the smallest sha256, at most
    :data:`MAX_HELDOUT_IMAGES` and at most one in :data:`HELDOUT_SHARE`; every entry
    of a held-out image is held out, so no held-out image is trained on. Fewer than
    :data:`HELDOUT_SHARE` images: nothing is held out.
    """
    images = sorted({s.image_sha256 for s in sequences})
    heldout_images = set(images[:min(MAX_HELDOUT_IMAGES, len(images) // HELDOUT_SHARE)])
    return ([s for s in sequences if s.image_sha256 not in heldout_images],
            [s for s in sequences if s.image_sha256 in heldout_images])


def collate(sequences: list[TrainingSequence], pad_id: int) -> Batch:
    """Right-pad ``sequences`` to the longest; padding has no attention and no loss."""
    length = max(s.num_tokens for s in sequences)
    token_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
    image_mask = torch.zeros((len(sequences), length), dtype=torch.bool)  # (B, T)
    for row, sequence in enumerate(sequences):
        n = sequence.num_tokens
        token_ids[row, :n] = torch.tensor(sequence.token_ids)
        labels[row, :n] = torch.tensor(sequence.labels)
        attention_mask[row, :n] = 1
        image_mask[row, :n] = torch.tensor(sequence.image_mask)
    return Batch(token_ids, labels, attention_mask, image_mask, tuple(s.image_sha256 for s in sequences))
