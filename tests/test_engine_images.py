"""Images through the Engine on a tiny random LLaVA: each image encoded once, cached tokens reported."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
from PIL import Image

from assistant.engine.cache import EmbeddingCache
from assistant.engine.engine import Engine
from assistant.engine.model import ChatModel
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, ImageChunk, TextChunk
from assistant.engine.sampling import SamplingParams
from assistant.images import decode_stored
from tests.engine_fixtures import message
from tests.vision_fixtures import GRID, IMAGES, STORED, generate, image_chunk, load_tiny_llava_chat, make_image

HIGH, LOW = GRID**2, 4  # CLIP tower, "default" select: the 4 × 4 grid; low pools it to 2 × 2
PICTURE = image_chunk(make_image(1))


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("llava"))


@pytest.fixture
def model(llava: ChatModel) -> ChatModel:
    """The loaded LLaVA with an empty image cache of its own."""
    return ChatModel(llava.hf_model, llava.tokenizer, vision=llava.vision, image_cache=EmbeddingCache(1 << 24))


@pytest.fixture
def encoder_calls(model: ChatModel) -> Iterator[list[int]]:
    """One entry (the batch size) per forward of the vision tower."""
    calls: list[int] = []
    def record(module: object, args: tuple, kwargs: dict, output: object) -> None:
        pixels = args[0] if args else kwargs["pixel_values"]  # (N, 3, S, S)
        calls.append(pixels.shape[0])

    handle = model.vision.vision_tower.register_forward_hook(record, with_kwargs=True)  # type: ignore[union-attr]
    yield calls
    handle.remove()


def user(*parts: str | ImageChunk) -> ChatMessage:
    return ChatMessage("user", tuple(TextChunk(p) if isinstance(p, str) else p for p in parts))


def test_a_conversation_encodes_its_image_once(model: ChatModel, encoder_calls: list[int]) -> None:
    """Each turn repeats the whole history, as the session does; the image is encoded on turn 1 only."""
    engine = Engine(model)
    history: tuple[ChatMessage, ...] = (user("What is in this picture?", PICTURE),)
    cached = []
    for follow_up in ("Tell me more.", "And the colours?", None):
        reply, finished = generate(engine, history)
        assert finished.num_image_tokens == HIGH and finished.num_output_tokens > 0
        cached.append(finished.num_cached_image_tokens)
        if follow_up is not None:
            history += (message("assistant", reply), user(follow_up))

    assert cached == [0, HIGH, HIGH]
    assert encoder_calls == [1]
    assert model.image_cache is not None and len(model.image_cache) == 1


def test_another_conversation_sending_the_same_image_reuses_it(model: ChatModel, encoder_calls: list[int]) -> None:
    engine = Engine(model)
    generate(engine, (user("What is in this picture?", PICTURE),))
    same_bytes = ImageChunk(sha256=PICTURE.sha256, detail="high")  # "auto" is "high"

    _, finished = generate(engine, (message("system", "Be brief."), user(same_bytes, "Describe it.")))

    assert encoder_calls == [1]
    assert finished.num_image_tokens == finished.num_cached_image_tokens == HIGH


def test_detail_levels_cost_different_tokens_and_are_cached_apart(model: ChatModel,
                                                                  encoder_calls: list[int]) -> None:
    engine = Engine(model)
    low = ImageChunk(sha256=PICTURE.sha256, detail="low")

    _, high_done = generate(engine, (user("Look.", PICTURE),))
    _, low_done = generate(engine, (user("Look.", low),))
    _, low_again = generate(engine, (user("Look again.", low),))

    assert (high_done.num_image_tokens, low_done.num_image_tokens) == (HIGH, LOW)
    assert low_done.num_prompt_tokens == high_done.num_prompt_tokens - (HIGH - LOW)
    assert (high_done.num_cached_image_tokens, low_done.num_cached_image_tokens) == (0, 0)
    assert low_again.num_cached_image_tokens == LOW
    assert encoder_calls == [1, 1] and model.image_cache is not None and len(model.image_cache) == 2


def test_an_image_repeated_in_one_request_is_encoded_once(model: ChatModel, encoder_calls: list[int]) -> None:
    engine = Engine(model)
    twice = (user("Compare", PICTURE, "with", PICTURE),)

    _, first = generate(engine, twice)
    _, second = generate(engine, twice)

    assert encoder_calls == [1]
    assert first.num_image_tokens == 2 * HIGH and first.num_cached_image_tokens == 0
    assert second.num_cached_image_tokens == 2 * HIGH


def test_image_bytes_are_fetched_only_on_cache_misses_in_one_call(model: ChatModel) -> None:
    calls: list[list[str]] = []

    def source(sha256s: Sequence[str]) -> Mapping[str, bytes]:
        calls.append(list(sha256s))
        return IMAGES(sha256s)

    second = image_chunk(make_image(5))
    conversation = (user("Compare", PICTURE, "with", second),)
    engine = Engine(model)
    for _ in range(2):
        engine.add_request(GenerationRequest("r", conversation, SamplingParams(max_output_tokens=2),
                                             image_source=source), lambda event: None)
        while engine.step():
            pass
    assert calls == [[PICTURE.sha256, second.sha256]]  # one fetch for both; the next turn none

    gone = image_chunk(make_image(6))
    events: list[EngineEvent] = []
    engine.add_request(GenerationRequest("g", (user("And this?", gone),), image_source=lambda sha256s: {}),
                       events.append)
    while engine.step():
        pass
    assert isinstance(events[-1], Finished) and events[-1].code == "image_not_found"


def test_greedy_generation_with_images_is_deterministic(model: ChatModel) -> None:
    """The same text from freshly encoded and from cached embeddings, and the image changes the logits."""
    engine = Engine(model)
    conversation = (user("What is in this picture?", PICTURE),)

    fresh, _ = generate(engine, conversation, max_output_tokens=12)
    cached, done = generate(engine, conversation, max_output_tokens=12)
    assert model.image_cache is not None
    model.image_cache.clear()
    fresh_again, _ = generate(engine, conversation, max_output_tokens=12)

    assert done.num_cached_image_tokens == HIGH
    assert fresh == cached == fresh_again and fresh
    other = (user("What is in this picture?", image_chunk(make_image(2))),)
    prompts = [model.render(messages, 1000) for messages in (conversation, other)]
    logits = [model.prefill(prompt, model.encode_images(prompt.images, IMAGES)[0])[0] for prompt in prompts]
    assert not torch.allclose(logits[0], logits[1])


def test_images_are_decoded_upright_and_rgb() -> None:
    """EXIF orientation is applied and transparency flattened, as assistant.images does for the store."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    sideways = image_chunk(make_image(3, size=(64, 48)), image_format="JPEG", exif=exif.tobytes())
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buffer, format="PNG")

    assert decode_stored(STORED[sideways.sha256]).size == (48, 64)
    flat = decode_stored(buffer.getvalue())
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)


def test_without_images_nothing_is_encoded(model: ChatModel, encoder_calls: list[int]) -> None:
    _, finished = generate(Engine(model), (user("Hello"),))

    assert encoder_calls == [] and finished.num_image_tokens == finished.num_cached_image_tokens == 0
