"""sample(): greedy, temperature, nucleus, penalties, seeded reproducibility; the ranges of every parameter."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from assistant.engine.sampling import (SamplingParams, apply_penalties, check_sampling_value, draw, make_generator,
                                       nucleus, sample)


def test_greedy_is_argmax_and_ignores_the_generator() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(temperature=0.0)
    assert {sample(logits, params, make_generator(seed)) for seed in range(10)} == {1}


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, seed=7)

    def draw(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [sample(logits, params, generator) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_temperature_one_follows_the_distribution() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75]
    generator = make_generator(0)
    counts = Counter(sample(logits, SamplingParams(temperature=1.0), generator) for _ in range(4000))
    assert 0.72 < counts[1] / 4000 < 0.78


def test_low_temperature_sharpens() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])
    generator = make_generator(0)
    counts = Counter(sample(logits, SamplingParams(temperature=0.1), generator) for _ in range(1000))
    assert counts[1] > 990


def test_a_tiny_temperature_is_all_but_greedy_not_nan() -> None:
    """1e-300 is in range (0..2); dividing the logits by it overflows to inf, whose softmax was nan."""
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, float("-inf")])
    for top_p in (1.0, 0.9):
        params = SamplingParams(temperature=1e-300, top_p=top_p)
        assert {sample(logits, params, make_generator(seed)) for seed in range(10)} == {1}


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    generator = make_generator(0)
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), generator) for _ in range(200)} == {0}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), generator) for _ in range(500)} == {0, 1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=1.0), generator) for _ in range(500)} == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.999])
def test_the_nucleus_is_the_one_a_full_sort_gives(temperature: float, top_p: float) -> None:
    """Found among a few topk candidates (more when they fall short), it must equal sorting the whole vocabulary."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(49152, generator=generator) * 3 / temperature, dim=-1)
    head, token_ids = nucleus(probs, top_p)
    ordered, order = torch.sort(probs, descending=True)
    kept = int(((torch.cumsum(ordered, dim=-1) - ordered) < top_p).sum())
    assert int((head > 0).sum()) == kept
    assert set(token_ids[:kept].tolist()) == set(order[:kept].tolist())
    assert torch.equal(head[:kept], ordered[:kept])


def test_a_draw_follows_the_weights_and_never_picks_a_zero() -> None:
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 0.0])  # unnormalized, zeros between and at both ends
    generator = make_generator(0)
    counts = Counter(draw(weights, generator) for _ in range(8000))
    assert set(counts) == {1, 3, 4}
    assert 0.47 < counts[1] / 8000 < 0.53 and 0.22 < counts[3] / 8000 < 0.28


def test_bf16_logits_are_accepted() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0], dtype=torch.bfloat16)
    assert sample(logits, SamplingParams(temperature=0.5, top_p=0.9), make_generator(1)) == 1


@pytest.mark.gpu
def test_sampling_cuda_logits_with_the_cpu_generator() -> None:
    logits = torch.randn(100, device="cuda")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    first = sample(logits, params, make_generator(3))
    assert first == sample(logits.cpu(), params, make_generator(3))


def test_frequency_and_presence_penalties_follow_openai() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    penalized = apply_penalties(logits, params, prompt_token_ids=[3, 3], output_token_ids=[0, 0, 1])
    # token 0 twice: 1 - 2*0.5 - 0.25; token 1 once: 1 - 0.5 - 0.25; the prompt's token 3 is not penalized
    assert penalized.tolist() == [-0.25, 0.25, 1.0, 1.0]
    assert logits.tolist() == [1.0] * 4  # the model's row is left alone


def test_frequency_and_presence_penalties_equal_the_formula_over_the_whole_vocabulary() -> None:
    """Only the tokens the output holds are touched; every other logit stays bit for bit."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        vocab = 500
        logits = torch.randn(vocab, generator=generator) * 5
        output = torch.randint(0, 40 if trial % 2 else vocab, (1 + trial * 7,), generator=generator).tolist()
        params = SamplingParams(frequency_penalty=0.3 + trial / 20, presence_penalty=-0.7 + trial / 30)
        counts = torch.bincount(torch.tensor(output), minlength=vocab).float()  # (vocab,)
        expected = logits - (counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty)
        assert torch.equal(apply_penalties(logits, params, (), output), expected)


def test_repetition_penalty_covers_prompt_and_output_and_keeps_signs() -> None:
    logits = torch.tensor([2.0, -2.0, 2.0, 2.0])
    penalized = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0],
                                output_token_ids=[1, 1])
    assert penalized.tolist() == [1.0, -4.0, 2.0, 2.0]


def test_end_of_sequence_tokens_are_never_penalized() -> None:
    logits = torch.tensor([2.0, 2.0, 2.0])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    penalized = apply_penalties(logits, params, prompt_token_ids=[0, 2], output_token_ids=[0, 2],
                                exempt_token_ids={2})
    assert penalized.tolist() == [2.0 / 2.0 - 1.0 - 0.5, 2.0, 2.0]


def test_penalties_steer_greedy_picks_away_from_repeats() -> None:
    logits = torch.tensor([3.0, 2.5, 0.0])
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(0), output_token_ids=[0]) == 0
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert sample(logits, params, make_generator(0), output_token_ids=[0]) == 1


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("temperature", [0.0, 2.0], [-0.1, 2.01, math.nan, math.inf]),
    ("top_p", [0.01, 1.0], [0.0, 1.5, math.nan]),
    ("frequency_penalty", [-2.0, 0.0, 2.0], [-2.5, 2.5, math.inf]),
    ("presence_penalty", [-2.0, 2.0], [3.0, -math.inf]),
    ("repetition_penalty", [0.5, 1.0, 2.0], [0.0, -1.0, 2.5, math.nan]),
    ("max_output_tokens", [None, 1], [0, -3]),
    ("seed", [None, 0, 2**63 - 1], [-1, 2**63]),
    ("stop", [(), ("a",) * 4], [("a",) * 5, ("",), ("x" * 201,)]),
])
def test_each_parameter_has_one_range(name: str, good: list, bad: list) -> None:
    for value in good:
        assert check_sampling_value(name, value) is None
        SamplingParams(**{name: value})
    for value in bad:
        assert check_sampling_value(name, value)
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
