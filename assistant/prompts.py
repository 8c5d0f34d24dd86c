"""Prompts as data, and a conversation rendered as the engine's chat messages.

System prompts live as text files in the repository's ``prompts/`` directory.
``build_messages`` is pure: stored items in, :class:`~assistant.engine.request.ChatMessage`
tuples out, images by reference (sha256 and detail). :class:`StoreImages` is the
image source the engine asks for the bytes of the images whose embeddings it has
not cached yet. The chat template itself is applied by the engine, which owns the
tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.engine.request import ChatMessage, ImageChunk, TextChunk
from assistant.items import Item
from assistant.tool_calls import render_tool_calls, tool_results_message

if TYPE_CHECKING:
    from assistant.store import Store

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
DEFAULT_SYSTEM_PROMPT_FILE = PROMPTS_DIR / "system.txt"


def load_system_prompt(path: str | Path | None = None) -> str:
    """The default system prompt: the given file, else prompts/system.txt."""
    file = Path(path) if path else DEFAULT_SYSTEM_PROMPT_FILE
    return file.read_text(encoding="utf-8").strip()


def build_messages(instructions: str, items: Sequence[Item]) -> tuple[ChatMessage, ...]:
    """Instructions first (as a system message, when non-empty), then every item in order.

    Items without any content (an assistant message cancelled before its first
    token) are skipped: chat templates render them as empty turns that only
    confuse the model. Tool calls are written as the model writes them
    (:func:`assistant.tool_calls.render_tool_calls`), consecutive calls as one
    assistant turn; consecutive results as one user turn of ``<tool_response>`` blocks.
    """
    messages: list[ChatMessage] = []
    if instructions:
        messages.append(ChatMessage("system", (TextChunk(instructions),)))
    for kind, run in groupby(items, key=lambda item: item.type):
        if kind != "message":
            messages.append(_tool_message(list(run)))
            continue
        for item in run:
            parts: list[TextChunk | ImageChunk] = []
            for part in item.content:
                if part.is_image:
                    parts.append(ImageChunk(part.image_sha256 or "", part.detail))  # type: ignore[arg-type]
                elif part.text:
                    parts.append(TextChunk(part.text))
            if parts:
                messages.append(ChatMessage(item.role, tuple(parts)))
    return tuple(messages)


def _tool_message(run: Sequence[Item]) -> ChatMessage:
    if run[0].type == "function_call":
        text = render_tool_calls([(item.name or "", item.arguments or "") for item in run])
        return ChatMessage("assistant", (TextChunk(text),))
    return tool_results_message([item.output or "" for item in run])


@dataclass(frozen=True)
class StoreImages:
    """The image source of a response: bytes the caller holds (``inline``: a response's own input images, which
    are not stored), then the store, in one query for the rest. An image that is gone is left out."""

    store: Store
    inline: Mapping[str, bytes] = field(default_factory=dict)

    def __call__(self, sha256s: Sequence[str]) -> dict[str, bytes]:
        found = {sha256: self.inline[sha256] for sha256 in sha256s if sha256 in self.inline}
        rest = [sha256 for sha256 in sha256s if sha256 not in found]
        if rest:
            found.update((sha256, image.data) for sha256, image in self.store.get_images(rest).items())
        return found
