"""Client input items → domain items: decode and check every part, shared by the Realtime session and the
HTTP API. Pure of sockets and tensors; image decoding is CPU work, so callers run it in a worker thread.

:func:`validate_item` checks an item on its own (image formats and sizes, images per
message, image tokens per message); :func:`conversation_budget` is the check the store
runs, inside the insert's transaction, against the images a conversation already holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from assistant import images as image_codec
from assistant.errors import BudgetExceeded, ImageRejected
from assistant.events import new_id
from assistant.items import ContentPart, Item, StoredImage
from assistant.protocol import ImageInput, ItemInput


@dataclass(frozen=True)
class ImageBudget:
    """Image limits of one session; ``tokens_per_image`` is None when the model takes no images."""

    limits: image_codec.ImageLimits
    max_images_per_conversation: int
    max_tokens_per_message: int
    max_tokens_per_conversation: int
    tokens_per_image: Callable[[str], int] | None


def validate_item(item_input: ItemInput, budget: ImageBudget, param: str,
                  url_field: str = "image_url") -> tuple[Item, list[StoredImage]]:
    """Decode and check every part; nothing is stored here. ``param`` is the item's path in the request, and
    ``url_field`` an image part's data URL's path inside the part (Chat Completions: ``image_url.url``).
    A tool call or a tool's result has no parts: it was checked whole by the protocol."""
    item_id = item_input.id or new_id("item")
    if item_input.type != "message":
        return Item(item_id, item_input.role, (), type=item_input.type,  # type: ignore[arg-type]
                    call_id=item_input.call_id, name=item_input.name, arguments=item_input.arguments,
                    output=item_input.output), []
    images: list[StoredImage] = []
    parts: list[ContentPart] = []
    image_inputs = [p for p in item_input.content if isinstance(p, ImageInput)]
    if image_inputs:
        if budget.tokens_per_image is None:
            first = next(i for i, part in enumerate(item_input.content) if isinstance(part, ImageInput))
            raise ImageRejected("This model does not accept images; send text only.",
                                param=f"{param}.content[{first}]", code="image_input_not_supported")
        image_codec.check_image_count(len(image_inputs), budget.limits, param=f"{param}.content")
    for index, part in enumerate(item_input.content):
        part_param = f"{param}.content[{index}]"
        if isinstance(part, ImageInput):
            url_param = f"{part_param}.{url_field}"
            _, data = image_codec.parse_image_url(part.image_url, budget.limits, param=url_param)
            image, _ = image_codec.load_image(data, budget.limits, param=url_param)
            images.append(image)
            parts.append(ContentPart("input_image", image_sha256=image.sha256, detail=part.detail))
        else:
            parts.append(ContentPart(part.type, text=part.text))
    if images:
        _check_message_budget(budget, [p for p in parts if p.is_image], param)
    return Item(item_id, item_input.role, tuple(parts)), images


def _check_message_budget(budget: ImageBudget, image_parts: list[ContentPart], param: str) -> None:
    assert budget.tokens_per_image is not None
    message_tokens = sum(budget.tokens_per_image(p.detail) for p in image_parts)
    if message_tokens > budget.max_tokens_per_message:
        raise BudgetExceeded(f"These images need {message_tokens} image tokens; a message may use at most "
                             f"{budget.max_tokens_per_message}. Send fewer images or use detail \"low\".",
                             param=f"{param}.content", code="too_many_image_tokens")


def conversation_budget(budget: ImageBudget, image_parts: list[ContentPart],
                        param: str) -> Callable[[list[ContentPart]], None]:
    """The check the store runs, in the insert's transaction, against the images already stored."""
    tokens_of = budget.tokens_per_image
    assert tokens_of is not None

    def check(existing: list[ContentPart]) -> None:
        if len(existing) + len(image_parts) > budget.max_images_per_conversation:
            raise BudgetExceeded(f"This conversation already holds {len(existing)} images; the limit is "
                                 f"{budget.max_images_per_conversation}.", param=f"{param}.content",
                                 code="too_many_images")
        total = sum(tokens_of(p.detail) for p in [*existing, *image_parts])
        if total > budget.max_tokens_per_conversation:
            raise BudgetExceeded(f"This conversation would hold {total} image tokens; the limit is "
                                 f"{budget.max_tokens_per_conversation}.", param=f"{param}.content",
                                 code="too_many_image_tokens")

    return check
