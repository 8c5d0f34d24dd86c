"""Image–text matching: the score arithmetic on a tiny random LLaVA, the ranking on a model where the image
clearly matters (tests.matching_fixtures), and score requests through the engine."""

from __future__ import annotations

import asyncio

import pytest

from assistant.engine import matching
from assistant.engine.async_engine import AsyncEngine
from assistant.engine.engine import Engine
from assistant.engine.matching import image_chunk, match, score_answers
from assistant.engine.model import ChatModel
from assistant.engine.request import (ChatMessage, EngineEvent, Finished, GenerationRequest, MatchScore,
                                      ScoreRequest, TextChunk, TokenDelta, ranking)
from assistant.engine.sampling import SamplingParams
from assistant.errors import ImageRejected
from tests.matching_fixtures import CAPTIONS, bag_of_words_chat_model, save_bag_of_words_model, solid_png
from tests.vision_fixtures import load_tiny_llava_chat, make_image

TEXTS = ["a cat", "two red circles on a grey background", "x", "What is the capital of France? Paris."]
PICTURE, SOURCE = image_chunk(make_image(1))


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    return load_tiny_llava_chat(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def seeing(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    """The bag-of-words model: it sees a solid red image as "a red square" (tests.matching_fixtures)."""
    return bag_of_words_chat_model(save_bag_of_words_model(tmp_path_factory.mktemp("bow")))


def generation_log_likelihood(model: ChatModel, messages: list[ChatMessage], answer: str) -> float:
    """What generation assigns to ``answer``'s tokens: the serving prompt, prefill, then one decode per token."""
    prompt = model.render(messages, model.max_context_tokens)
    logits, cache = model.prefill(prompt, model.encode_images(prompt.images, SOURCE)[0])  # (vocab,)
    total = 0.0
    for token_id in model.tokenizer.encode(answer, add_special_tokens=False, split_special_tokens=True):
        total += float(logits.log_softmax(-1)[token_id])
        logits = model.decode(token_id, cache, has_images=bool(prompt.images))
    return total


@pytest.mark.parametrize("instructions", ["", "You describe images."])
def test_score_is_the_mean_log_likelihood_with_the_image_and_the_gain_is_minus_without(llava: ChatModel,
                                                                                       instructions: str) -> None:
    scores = score_answers(llava, PICTURE, TEXTS, "Describe this image.", instructions, source=SOURCE)
    system = [ChatMessage("system", (TextChunk(instructions),))] if instructions else []
    for index, (text, score) in enumerate(zip(TEXTS, scores, strict=True)):
        with_image = generation_log_likelihood(llava, [*system, ChatMessage("user", (
            PICTURE, TextChunk("Describe this image.")))], text)
        without = generation_log_likelihood(llava, [*system, ChatMessage("user", (
            TextChunk("Describe this image."),))], text)
        assert (score.index, score.text) == (index, text)
        assert score.log_likelihood == pytest.approx(with_image, abs=1e-3)
        assert score.log_likelihood_without_image == pytest.approx(without, abs=1e-3)
        assert score.image_gain == score.log_likelihood - score.log_likelihood_without_image
        assert score.num_tokens == len(llava.tokenizer.encode(text, add_special_tokens=False))
        assert score.score == score.mean_log_likelihood == pytest.approx(score.log_likelihood / score.num_tokens)
    assert len({round(s.image_gain, 3) for s in scores}) == len(TEXTS)  # the image changes each text differently


def test_batched_scores_equal_one_by_one(llava: ChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = [score_answers(llava, PICTURE, [text], source=SOURCE)[0] for text in TEXTS]
    for batch_size in (2, 16):
        monkeypatch.setattr(matching, "MAX_BATCH_TEXTS", batch_size)
        batched = score_answers(llava, PICTURE, TEXTS, source=SOURCE)
        assert [s.index for s in batched] == list(range(len(TEXTS)))
        for one, many in zip(alone, batched, strict=True):
            assert many.log_likelihood == pytest.approx(one.log_likelihood, abs=1e-3)
            assert many.log_likelihood_without_image == pytest.approx(one.log_likelihood_without_image, abs=1e-3)


def test_match_returns_best_first_and_keeps_each_texts_index(llava: ChatModel) -> None:
    ranked = match(llava, make_image(1), TEXTS, instructions="")
    assert sorted(s.index for s in ranked) == list(range(len(TEXTS)))
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)
    assert [s.text for s in ranked] == [TEXTS[s.index] for s in ranked]
    in_order = score_answers(llava, PICTURE, TEXTS, source=SOURCE)
    assert [s.index for s in ranked] == ranking(in_order)


def test_ranking_is_score_order_and_ties_keep_the_texts_order() -> None:
    def scored(index: int, with_image: float, without: float) -> MatchScore:
        return MatchScore(index, f"t{index}", with_image, without, 2)

    scores = [scored(0, -5.0, -6.0), scored(1, -9.0, -1.0), scored(2, -1.0, -4.0), scored(3, -5.0, -9.0)]
    assert ranking(scores) == [2, 0, 3, 1]  # -0.5, -2.5, -2.5 (index 0 first), -4.5: the gain does not rank


@pytest.mark.parametrize("colour, caption", list(CAPTIONS.items()))
def test_by_gain_the_true_caption_ranks_first_when_the_image_matters(seeing: ChatModel,
                                                                     colour: tuple[int, int, int],
                                                                     caption: str) -> None:
    """The bag-of-words model's image moves a caption's log-likelihood by a few nats, less than its texts'
    likelihoods on their own differ: what the gain is for."""
    ranked = match(seeing, solid_png(colour), [*CAPTIONS.values(), "a dog", "Hello world"], scoring="gain")
    assert ranked[0].text == caption
    assert ranked[0].score == ranked[0].image_gain > 1.0  # the image made it clearly likelier
    assert all(s.score < ranked[0].score - 1.0 for s in ranked[1:])
    by_likelihood = match(seeing, solid_png(colour), [*CAPTIONS.values(), "a dog", "Hello world"])
    assert by_likelihood[0].score == by_likelihood[0].mean_log_likelihood
    assert {s.text: s.image_gain for s in by_likelihood} == pytest.approx({s.text: s.image_gain for s in ranked})


def test_an_unknown_scoring_is_refused(seeing: ChatModel) -> None:
    with pytest.raises(ValueError, match="scoring must be one of likelihood, gain"):
        match(seeing, solid_png((255, 0, 0)), ["a red square"], scoring="pmi")


def test_an_image_the_model_sees_nothing_in_barely_moves_the_scores(seeing: ChatModel) -> None:
    assert all(abs(s.image_gain) < 0.5 for s in match(seeing, solid_png((9, 9, 9)), list(CAPTIONS.values())))


def test_the_image_is_encoded_once_and_then_served_from_the_cache(seeing: ChatModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = ChatModel(seeing.hf_model, seeing.tokenizer, vision=seeing.vision, image_cache=seeing.image_cache)
    model.image_cache.clear()
    calls: list[int] = []
    encode = model.vision.encode  # type: ignore[union-attr]
    monkeypatch.setattr(model.vision, "encode", lambda images, detail: calls.append(len(images)) or encode(images,
                                                                                                          detail))
    for _ in range(2):
        match(model, solid_png((255, 0, 0)), list(CAPTIONS.values()))
    assert calls == [1]


def test_match_refuses_what_it_cannot_score(llava: ChatModel, tiny_model: ChatModel) -> None:
    with pytest.raises(ValueError, match="no vision part"):
        match(tiny_model, make_image(1), ["a cat"])
    with pytest.raises(ValueError, match="non-empty"):
        match(llava, make_image(1), ["a cat", ""])
    with pytest.raises(ImageRejected) as info:
        match(llava, b"<svg xmlns='http://www.w3.org/2000/svg'/>", ["a cat"])
    assert (info.value.code, info.value.param) == ("image_unsupported_format", "image")


# ---------------------------------------------------------------- through the engine


def score_request(request_id: str, texts: tuple[str, ...] = ("a red square", "the blue sky")) -> ScoreRequest:
    image, source = image_chunk(solid_png((255, 0, 0)))
    return ScoreRequest(request_id, image, texts, instructions="", image_source=source)


def test_a_score_request_runs_in_the_step_that_admits_it_beside_a_generation(seeing: ChatModel) -> None:
    engine = Engine(seeing, max_num_running=2)
    generated: list[EngineEvent] = []
    scored: list[EngineEvent] = []
    engine.add_request(GenerationRequest("gen", (ChatMessage("user", (TextChunk("Hello"),)),),
                                         SamplingParams(temperature=0.0, max_output_tokens=5)), generated.append)
    engine.step()  # the generation is admitted and running
    engine.add_request(score_request("score"), scored.append)
    engine.step()
    [finished] = scored  # no deltas: one terminal event, in one step
    assert isinstance(finished, Finished) and finished.reason == "stop"
    request = score_request("x")
    expected = score_answers(seeing, request.image, request.texts, source=request.image_source)
    assert finished.scores == expected
    assert ranking(finished.scores) == [0, 1]
    assert not any(isinstance(e, Finished) for e in generated)  # the generation goes on
    while engine.step():
        pass
    assert isinstance(generated[-1], Finished) and generated[-1].reason == "length"
    assert all(isinstance(e, TokenDelta) for e in generated[:-1])


def test_an_aborted_score_request_is_cancelled_with_no_scores(seeing: ChatModel) -> None:
    engine = Engine(seeing, max_num_running=1)
    events: list[EngineEvent] = []
    engine.add_request(score_request("s"), events.append)
    engine.abort("s")
    while engine.step():
        pass
    assert events == [Finished(reason="cancelled")]


@pytest.mark.parametrize("texts, code", [
    (("a red square",), "invalid_prompt"),  # the text-only model below
    (("你好世界" * 250,), "context_length_exceeded"),  # 1,000 characters of 3-byte tokens: over 1,024 positions
])
def test_a_score_request_the_model_cannot_run_fails_with_a_code(seeing: ChatModel, tiny_model: ChatModel,
                                                                 texts: tuple[str, ...], code: str) -> None:
    model = tiny_model if code == "invalid_prompt" else seeing
    engine = Engine(model)
    events: list[EngineEvent] = []
    engine.add_request(score_request("s", texts), events.append)
    while engine.step():
        pass
    [finished] = events
    assert finished.reason == "error" and finished.scores == ()
    assert finished.code == code and finished.error


async def test_async_engine_score_returns_the_finished_event(seeing: ChatModel) -> None:
    engine = Engine(seeing)
    engine.start()
    try:
        finished = await asyncio.wait_for(AsyncEngine(engine).score(score_request("s")), 60)
    finally:
        engine.shutdown()
    assert finished.reason == "stop" and [s.text for s in finished.scores] == ["a red square", "the blue sky"]
    assert finished.scores[0].score > finished.scores[1].score


async def test_cancelling_the_awaiting_task_aborts_the_score_request(seeing: ChatModel) -> None:
    engine = Engine(seeing)  # not started: the request waits in the queue
    events: list[EngineEvent] = []
    task = asyncio.create_task(AsyncEngine(engine).score(score_request("s")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    original = engine.scheduler.waiting[0]
    original.sink = events.append  # see what the engine sends it
    while engine.step():
        pass
    assert events == [Finished(reason="cancelled")]

