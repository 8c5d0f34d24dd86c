"""sample(): greedy, temperature, nucleus, seeded reproducibility."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from assistant.engine.sampling import SamplingParams, make_generator, sample


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


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    generator = make_generator(0)
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), generator) for _ in range(200)} == {0}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), generator) for _ in range(500)} == {0, 1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=1.0), generator) for _ in range(500)} == {0, 1, 2}


def test_bf16_logits_are_accepted() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0], dtype=torch.bfloat16)
    assert sample(logits, SamplingParams(temperature=0.5, top_p=0.9), make_generator(1)) == 1


@pytest.mark.gpu
def test_sampling_cuda_logits_with_the_cpu_generator() -> None:
    logits = torch.randn(100, device="cuda")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    first = sample(logits, params, make_generator(3))
    assert first == sample(logits.cpu(), params, make_generator(3))
