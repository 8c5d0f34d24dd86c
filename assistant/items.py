"""Conversation items: the domain values shared by protocol, store, session and prompts.

These are plain frozen dataclasses with no I/O, no sockets and no tensors. The
protocol layer turns wire JSON into them (and back), the store persists them,
and the prompt layer renders them for the model.

Invariants:
- an item's ``content`` is a tuple of parts, in wire order;
- an ``input_image`` part refers to its image by ``image_sha256`` only; the
  bytes live once per hash in the store (``images`` table);
- ``role`` is one of ``ROLES``; ``status`` one of ``ITEM_STATUSES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Role = Literal["user", "system", "assistant"]
PartType = Literal["input_text", "output_text", "input_image"]
ItemStatus = Literal["completed", "in_progress", "incomplete"]
ItemType = Literal["message", "function_call", "function_call_output"]
Detail = Literal["low", "high", "auto"]

ROLES: tuple[str, ...] = ("user", "system", "assistant")
ITEM_STATUSES: tuple[str, ...] = ("completed", "in_progress", "incomplete")
DETAILS: tuple[str, ...] = ("low", "high", "auto")


@dataclass(frozen=True)
class ContentPart:
    """One part of a message: text, or a reference to a stored image."""

    type: PartType
    text: str | None = None
    image_sha256: str | None = None
    detail: Detail = "auto"

    @property
    def is_image(self) -> bool:
        return self.type == "input_image"


@dataclass(frozen=True)
class Item:
    """One conversation item: a message (``content``), a tool call the assistant made (``function_call``:
    ``call_id``, ``name``, ``arguments`` as JSON text; role ``assistant``), or its result
    (``function_call_output``: ``call_id``, ``output``; role ``user``)."""

    id: str
    role: Role
    content: tuple[ContentPart, ...] = ()
    status: ItemStatus = "completed"
    type: ItemType = "message"
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    @property
    def text(self) -> str:
        """All text parts joined, in order (image parts contribute nothing)."""
        return "".join(part.text or "" for part in self.content if not part.is_image)

    @property
    def image_hashes(self) -> tuple[str, ...]:
        return tuple(p.image_sha256 for p in self.content if p.is_image and p.image_sha256)


@dataclass(frozen=True)
class Usage:
    """Token accounting of one response, as reported in ``response.done``."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    image_tokens: int = 0
    cached_image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def text_tokens(self) -> int:
        return self.input_tokens - self.image_tokens


@dataclass(frozen=True)
class ResponseRecord:
    """A finished (or running) response as the store keeps it."""

    id: str
    conversation_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    reason: str | None = None
    output_item_ids: tuple[str, ...] = ()
    usage: Usage = field(default_factory=Usage)
    time_to_first_token_ms: float | None = None
    duration_ms: float | None = None


@dataclass(frozen=True)
class StoredImage:
    """A validated image file, stored once per content hash."""

    sha256: str
    mime_type: str
    width: int
    height: int
    data: bytes

    @property
    def num_bytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ConversationInfo:
    """A stored conversation, without its items."""

    id: str
    created_at: datetime
    metadata: dict[str, str] | None = None
