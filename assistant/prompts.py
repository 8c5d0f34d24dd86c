"""Prompts as data, and a conversation rendered as the engine's chat messages.

System prompts live as text files in the repository's ``prompts/`` directory.
``build_messages`` is pure: stored items (plus the images they reference, as
bytes) in, :class:`~assistant.engine.request.ChatMessage` tuples out. The chat
template itself is applied by the engine, which owns the tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from assistant.engine.request import ChatMessage, ImageChunk, TextChunk
from assistant.items import Item, StoredImage

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
DEFAULT_SYSTEM_PROMPT_FILE = PROMPTS_DIR / "system.txt"


def load_system_prompt(path: str | Path | None = None) -> str:
    """The default system prompt: the given file, else prompts/system.txt."""
    file = Path(path) if path else DEFAULT_SYSTEM_PROMPT_FILE
    return file.read_text(encoding="utf-8").strip()


def build_messages(
    instructions: str,
    items: Sequence[Item],
    images: Mapping[str, StoredImage],
) -> tuple[ChatMessage, ...]:
    """Instructions first (as a system message, when non-empty), then every item in order.

    Items without any content (an assistant message cancelled before its first
    token) are skipped: chat templates render them as empty turns that only
    confuse the model.
    """
    messages: list[ChatMessage] = []
    if instructions:
        messages.append(ChatMessage("system", (TextChunk(instructions),)))
    for item in items:
        parts: list[TextChunk | ImageChunk] = []
        for part in item.content:
            if part.is_image:
                image = images[part.image_sha256 or ""]
                parts.append(ImageChunk(image.sha256, image.data, part.detail))
            elif part.text:
                parts.append(TextChunk(part.text))
        if parts:
            messages.append(ChatMessage(item.role, tuple(parts)))
    return tuple(messages)
