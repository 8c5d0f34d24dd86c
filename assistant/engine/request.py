"""What goes into the engine and what comes out: the engine's whole public contract.

The session builds a :class:`GenerationRequest` from stored items (text and
image *bytes*, never tensors) and receives a stream of :class:`TokenDelta`
events ending in exactly one :class:`Finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from assistant.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class ImageChunk:
    """A validated image: ``data`` is the stored (already validated) file bytes."""

    sha256: str
    data: bytes
    detail: Literal["low", "high", "auto"] = "auto"


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    parts: tuple[TextChunk | ImageChunk, ...]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenDelta:
    """New text, safe to show (never a split UTF-8 character, never part of a stop string)."""

    text: str
    num_tokens: int


@dataclass(frozen=True)
class Finished:
    """The one terminal event of a request."""

    reason: FinishReason
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_image_tokens: int = 0
    num_cached_image_tokens: int = 0
    error: str | None = None  # log-safe description when reason == "error"


EngineEvent = TokenDelta | Finished
