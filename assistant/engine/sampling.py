"""Sampling parameters and the sampling step.

``SamplingParams`` is the one record of how tokens are picked: the session keeps
its defaults and ``session.update`` / ``response.create`` overrides as one, the
engine only reads it. :func:`check_sampling_value` is the one place that knows
each parameter's range; the protocol (coded errors), the config (startup errors)
and ``SamplingParams`` itself (programming errors) all ask it.

``sample`` turns one row of logits into a token id: penalties, then temperature,
then nucleus filtering (:func:`nucleus`), then one draw from the request's own
generator (:func:`draw`).

torch is imported inside the functions that need it, so the protocol and the
session (which build ``SamplingParams``) never import torch through this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200
# Top-p filtering first looks at the tokens at least this likely (less likely ones too while those hold less than
# top_p).
NUCLEUS_THRESHOLD = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    ``max_output_tokens`` None means "until the model stops or the context is full".
    ``stop`` strings end generation; the stop string itself is not emitted.
    ``seed`` makes sampling reproducible for one request.
    ``frequency_penalty`` / ``presence_penalty`` (OpenAI's, -2..2) lower the logit of
    every token already generated in this response by ``count * frequency +
    presence``. ``repetition_penalty`` (vLLM's and transformers', 1 = off) divides
    the positive logits, and multiplies the negative ones, of every token seen in the
    prompt or the output.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_output_tokens: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # The protocol and the config already turned bad values into coded errors,
        # so a failure here is a programming error.
        for f in dataclasses.fields(self):
            problem = check_sampling_value(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"{f.name} {problem}")

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))


def check_sampling_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the parameter ``name`` ("must be ..."), or None if it is fine.

    Types are the caller's concern; this checks ranges (NaN and infinities fail every range).
    """
    def within(low: float, high: float, *, open_low: bool = False) -> bool:
        return math.isfinite(value) and (low < value if open_low else low <= value) and value <= high

    match name:
        case "temperature":
            return None if within(0.0, 2.0) else "must be between 0 and 2"
        case "top_p":
            return None if within(0.0, 1.0, open_low=True) else "must be greater than 0 and at most 1"
        case "frequency_penalty" | "presence_penalty":
            return None if within(-2.0, 2.0) else "must be between -2 and 2"
        case "repetition_penalty":
            return None if within(0.0, 2.0, open_low=True) else "must be greater than 0 and at most 2 (1 = off)"
        case "seed":
            return None if value is None or 0 <= value < 2**63 else "must be a non-negative 63-bit integer"
        case "max_output_tokens":
            return None if value is None or value >= 1 else "must be a positive integer"
        case "stop":
            if len(value) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in value):
                return f"takes at most {MAX_STOP_SEQUENCES} non-empty strings of up to {MAX_STOP_CHARS} characters"
            return None
    raise KeyError(name)


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: seeded when ``seed`` is given, else from fresh entropy."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_token_ids: Sequence[int],
                    output_token_ids: Sequence[int], exempt_token_ids: Collection[int] = ()) -> torch.Tensor:
    """``logits`` (vocab,) with the repetition, frequency and presence penalties applied (a new float32 tensor).

    ``exempt_token_ids`` (the end-of-sequence tokens) are never penalized: every chat prompt
    holds the end-of-turn token, and penalizing it would only keep the model from stopping.
    """
    import torch

    logits = logits.float().cpu().clone()  # (vocab,)
    vocab = logits.shape[-1]
    kept = logits[list(exempt_token_ids)].clone() if exempt_token_ids else None
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt_token_ids, *output_token_ids], dtype=torch.long).unique()  # (n,)
        seen = seen[seen < vocab]
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty,
                                   scores * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output_token_ids):
        # Only the tokens the output holds change (no count, and no pass, over the whole vocabulary).
        used, counts = torch.tensor(output_token_ids, dtype=torch.long).unique(return_counts=True)  # (n,) each
        counts, used = counts[used < vocab], used[used < vocab]
        logits[used] -= counts.float() * params.frequency_penalty + params.presence_penalty
    if kept is not None:
        logits[list(exempt_token_ids)] = kept
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, *,
           prompt_token_ids: Sequence[int] = (), output_token_ids: Sequence[int] = (),
           exempt_token_ids: Collection[int] = ()) -> int:
    """Pick the next token from one row of logits ``(vocab,)``.

    Penalties first (they apply to greedy picks too; never to ``exempt_token_ids``), then greedy when
    ``params.temperature == 0``, else temperature scaling, nucleus (top-p)
    filtering and one draw from ``generator`` (so one seed gives one sequence of
    tokens). The draw happens on the CPU, where the generator lives, whatever the
    model's device: the same seed samples the same tokens on CPU and GPU.
    """
    import torch

    if params.has_penalties:
        logits = apply_penalties(logits, params, prompt_token_ids, output_token_ids, exempt_token_ids)
    if params.is_greedy:
        from assistant.engine import int4_kernel  # torch's argmax where the kernel is not loaded

        return int(int4_kernel.argmax(logits.reshape(-1)))
    logits = logits.float().cpu()  # (vocab,)
    # A tiny temperature (1e-300 is in range) must not make nan: the logits are shifted so the largest is 0, and
    # the temperature kept at float32's smallest normal, so the others go to -inf rather than 0 / 0.
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        probs, token_ids = nucleus(probs, params.top_p)
        return int(token_ids[draw(probs, generator)])
    return draw(probs, generator)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest head of ``probs`` (vocab,) whose mass reaches ``top_p``, most likely first, the rest of
    the head at 0: ``(head probabilities, their token ids)``.

    A token stays if the mass before it is below ``top_p``. Sorting the whole vocabulary for that took 5 ms a
    token on a 49k vocabulary, and ``topk`` of 64 candidates 55 µs; the candidates are the tokens at least
    :data:`NUCLEUS_THRESHOLD` likely (one comparison over the vocabulary), and a hundred times less likely ones
    too while their mass falls short of ``top_p``. Exact: the candidates are the most likely tokens, so once
    their cumulative mass reaches ``top_p`` the nucleus ends among them.
    """
    import torch

    threshold = NUCLEUS_THRESHOLD
    while True:
        token_ids = torch.nonzero(probs >= threshold).squeeze(-1)  # (candidates,)
        head, order = torch.sort(probs[token_ids], descending=True)
        cumulative = torch.cumsum(head, dim=-1)
        if threshold == 0.0 or (len(head) and float(cumulative[-1]) >= top_p):
            break
        threshold = threshold / 100 if threshold > 1e-12 else 0.0
    mass_before = cumulative - head
    return head.masked_fill(mass_before >= top_p, 0.0), token_ids[order]


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn from the unnormalized weights ``probs`` (n,) with one uniform number of ``generator``
    (inverse transform: the first index whose cumulative weight passes it). ``torch.multinomial`` draws one
    exponential per entry instead: 1.4 ms on a 49k vocabulary against this one's few dozen microseconds."""
    import torch

    cumulative = torch.cumsum(probs.double(), dim=-1)  # (n,); float64 keeps the tail's small weights apart
    target = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, target, right=True))
    return min(index, probs.shape[-1] - 1)
