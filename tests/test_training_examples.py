"""Training sequences: serving's prompt layout, loss on the answers only, bad entries reported and skipped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from assistant.data.llava import DataError, Example
from assistant.engine.model import ChatModel
from assistant.engine.request import ChatMessage, ImageChunk, TextChunk
from assistant.training.examples import (IGNORE_INDEX, TrainingSequence, build_sequence, build_sequences, collate,
                                         read_examples, split_heldout)
from tests.engine_fixtures import FakeVision
from tests.training_fixtures import entry, write_llava

SHA = "ab" * 32
SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def model(tiny_model: ChatModel) -> ChatModel:
    """The tiny ChatML Llama with a stand-in vision part: 3 image positions at high detail."""
    return ChatModel(tiny_model.hf_model, tiny_model.tokenizer, vision=FakeVision(tiny_model.hidden_size))


def two_turns() -> Example:
    return Example(Path("cat.png"), (("What colour?", "red"), ("Where is it?", "on the left")), "data.json entry 1")


def test_labels_are_the_answers_and_the_token_that_ends_each(model: ChatModel) -> None:
    sequence = build_sequence(model, two_turns(), SHA, SYSTEM)

    labelled = [token for token, label in zip(sequence.token_ids, sequence.labels, strict=True)
                if label != IGNORE_INDEX]
    assert model.tokenizer.decode(labelled) == "red<|im_end|>on the left<|im_end|>"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sequence.token_ids, sequence.labels))
    assert sum(sequence.image_mask) == 3  # FakeVision's high-detail slot
    assert all(label == IGNORE_INDEX for label, is_image in zip(sequence.labels, sequence.image_mask) if is_image)
    assert sequence.num_answer_tokens == len(labelled)


def test_the_prompt_before_each_answer_is_what_serving_renders(model: ChatModel) -> None:
    """Training and serving share the template, the system prompt and the image ahead of the question."""
    sequence = build_sequence(model, two_turns(), SHA, SYSTEM)
    image = ImageChunk(SHA, "high")
    served = [ChatMessage("system", (TextChunk(SYSTEM),)), ChatMessage("user", (TextChunk("What colour?"), image))]
    later = served + [ChatMessage("assistant", (TextChunk("red"),)), ChatMessage("user", (TextChunk("Where is it?"),))]

    for messages, answer in ((served, "red"), (later, "on the left")):
        prompt = model.render(messages, 10_000).token_ids
        assert list(sequence.token_ids[:len(prompt)]) == prompt
        first_label = next(i for i in range(len(prompt), sequence.num_tokens) if sequence.labels[i] != IGNORE_INDEX)
        assert first_label == len(prompt)  # the loss starts right where generation would
        assert model.tokenizer.decode(sequence.token_ids[first_label:]).startswith(answer)


def test_bad_entries_are_reported_with_their_location_and_skipped(model: ChatModel, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    path = write_llava(tmp_path / "data.json", [
        entry("red.png", "<image>\nWhat colour?", "red"),
        entry("missing.png", "<image>\nWhat colour?", "red"),
        entry("red.png", "What colour?", "red"),
        entry("red.png", "<image>\nWhat colour?", " "),
        entry("red.png", "<image>\nDescribe it.", "red " * 1000),  # longer than the 2048-token context
    ])

    examples, problems = read_examples([path])
    sequences, too_long = build_sequences(examples, model, SYSTEM)
    problems += too_long

    assert [s.location for s in sequences] == [f"{path} entry 1"]
    assert sequences[0].image_sha256 == hashlib.sha256((tmp_path / "red.png").read_bytes()).hexdigest()
    assert [p.location for p in problems] == [f"{path} entry {n}" for n in (2, 3, 4, 5)]
    messages = [p.message for p in problems]
    assert "does not exist" in messages[0] and "<image>" in messages[1] and "empty answer" in messages[2]
    assert "context holds 2048" in messages[3]


def test_a_file_without_a_usable_entry_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    good = write_llava(tmp_path / "good.json", [entry("red.png", "<image>\nWhat?", "red")])
    bad = write_llava(tmp_path / "bad.json", [entry("missing.png", "<image>\nWhat?", "x")])

    with pytest.raises(DataError, match=r"bad\.json: no usable entry"):
        read_examples([good, bad])


def sequence(image: int, location: str, length: int = 3) -> TrainingSequence:
    return TrainingSequence(tuple(range(1, length + 1)), (IGNORE_INDEX,) * (length - 1) + (length,),
                            (True,) + (False,) * (length - 1), f"{image:064x}", Path(f"{image}.png"), location)


def test_the_heldout_split_is_fixed_and_keeps_each_image_on_one_side() -> None:
    sequences = [sequence(image, f"entry {image}-{k}") for image in range(40) for k in range(2)]

    train, heldout = split_heldout(sequences)
    again_train, again_heldout = split_heldout(list(reversed(sequences)))

    assert len(heldout) == 4 and {s.image_sha256 for s in heldout} == {f"{0:064x}", f"{1:064x}"}  # 40 images / 20
    assert {s.location for s in again_heldout} == {s.location for s in heldout}
    assert not {s.image_sha256 for s in train} & {s.image_sha256 for s in heldout}
    assert split_heldout(sequences[:38]) == (sequences[:38], [])  # 19 images: too few to spare one


def test_a_batch_pads_without_attention_or_loss() -> None:
    batch = collate([sequence(1, "a", length=3), sequence(2, "b", length=5)], pad_id=9)

    assert batch.token_ids.tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX],
                                     [IGNORE_INDEX] * 4 + [5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch.image_mask[:, 0].tolist() == [True, True] and batch.image_mask.sum() == 2
    assert batch.num_tokens == 8 and batch.image_sha256s == (f"{1:064x}", f"{2:064x}")
