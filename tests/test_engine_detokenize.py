"""IncrementalDetokenizer and StopChecker with real (in-memory) tokenizers."""

from __future__ import annotations

from typing import Any

import pytest

from assistant.engine.detokenize import IncrementalDetokenizer, StopChecker
from tests.engine_fixtures import byte_level_tokenizer, sentencepiece_tokenizer

TEXT = "Hello world 🙂 the fox says 你好，世界 🚀!"


@pytest.fixture(scope="module")
def byte_level() -> Any:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> Any:
    return sentencepiece_tokenizer()


def stream(tokenizer: Any, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    chunks = [detokenizer.push(token_id) for token_id in ids]
    chunks.append(detokenizer.flush())
    return chunks


def test_byte_level_splits_characters_across_tokens_but_streams_them_whole(byte_level: Any) -> None:
    ids = byte_level.encode(TEXT, add_special_tokens=False)
    # The premise: decoding token by token would show broken characters.
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)
    chunks = stream(byte_level, ids)
    assert "".join(chunks) == TEXT
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "🙂" in chunks or any(chunk.endswith("🙂") for chunk in chunks)


def test_byte_level_with_prompt_context(byte_level: Any) -> None:
    prompt = byte_level.encode("<|im_start|>assistant\n", add_special_tokens=False)
    ids = byte_level.encode(TEXT, add_special_tokens=False)
    assert "".join(stream(byte_level, ids, prompt)) == TEXT


def test_sentencepiece_keeps_spaces_and_joins_byte_fallback(sentencepiece: Any) -> None:
    ids = sentencepiece.encode("Hello world 🙂 the fox", add_special_tokens=False)
    tokens = sentencepiece.convert_ids_to_tokens(ids)
    assert "<0xF0>" in tokens  # the emoji is four byte-fallback tokens
    assert "".join(sentencepiece.decode([i]) for i in ids) != "Hello world 🙂 the fox"  # naive per-token loses spaces
    chunks = stream(sentencepiece, ids)
    assert "".join(chunks) == "Hello world 🙂 the fox"
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_sentencepiece_first_token_keeps_its_space_after_a_prompt(sentencepiece: Any) -> None:
    prompt = sentencepiece.encode("the lazy dog", add_special_tokens=False)
    ids = sentencepiece.encode("Hello world", add_special_tokens=False)
    assert "".join(stream(sentencepiece, ids, prompt)) == " Hello world"


def test_unfinished_character_is_flushed_as_replacement(byte_level: Any) -> None:
    ids = byte_level.encode("ok 🙂", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(byte_level)
    text = "".join(detokenizer.push(i) for i in ids[:-1])
    assert text == "ok"  # the emoji's first bytes are held back
    assert "\ufffd" in detokenizer.flush()


def test_stop_checker_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    checker = StopChecker(("END",))
    assert checker.push("hello E") == ("hello ", False)
    assert checker.push("N") == ("", False)
    assert checker.push("D and more") == ("", True)
    assert checker.push("later") == ("", True)
    assert checker.flush() == ""


def test_stop_checker_releases_a_false_alarm() -> None:
    checker = StopChecker(("END",))
    assert checker.push("the EN") == ("the ", False)
    assert checker.push("TRY") == ("ENTRY", False)
    assert checker.push("EN") == ("", False)
    assert checker.flush() == "EN"


def test_stop_checker_earliest_of_several_stops() -> None:
    checker = StopChecker(("world", "lo"))
    assert checker.push("hello world") == ("hel", True)


def test_stop_checker_stop_inside_one_chunk_and_without_stops() -> None:
    assert StopChecker(("\n\n",)).push("a\n\nb") == ("a", True)
    assert StopChecker(()).push("anything E") == ("anything E", False)
