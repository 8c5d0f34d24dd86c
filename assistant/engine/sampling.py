"""Sampling parameters and the sampling step.

``SamplingParams`` is the contract between the session and the engine: the
session builds it from session defaults and ``response.create`` overrides, the
engine only reads it. ``sample`` turns one row of logits into a token id.

torch is imported inside the functions that need it, so the session (which
builds ``SamplingParams``) never imports torch through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    ``max_output_tokens`` None means "until the model stops or the context is full".
    ``stop`` strings end generation; the stop string itself is not emitted.
    ``seed`` makes sampling reproducible for one request.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        # Checked on construction: the protocol layer already turned bad client
        # values into coded errors, so a failure here is a programming error.
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1 or None")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: seeded when ``seed`` is given, else from fresh entropy."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits ``(vocab,)``.

    Greedy when ``params.temperature == 0``; otherwise temperature scaling, then
    nucleus (top-p) filtering, then one draw from ``generator`` (so one seed gives
    one sequence of tokens). The draw happens on the CPU, where the generator lives,
    whatever the model's device: the same seed samples the same tokens on CPU and GPU.
    """
    import torch

    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (vocab,)
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (1,)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
