"""Tiny random checkpoints of the real architectures, written to a temp dir, for the vision tests.

Everything here is built from configs; nothing touches the Hugging Face hub.
Towers are 32 px with 8 px patches (a 4 × 4 grid = 16 patches), decoders are a
2-layer Llama of width 64. Every decoder Linear has an output width that is a
multiple of 32 and an even input width (q/o 64, k/v 32, gate/up 128, down 64):
bitsandbytes' nf4 kernel for CPUs with AVX512-BF16 needs both, and the tests
must run the same on every CPU. :func:`save_tiny_llava_chat` adds what serving
needs: the byte-level tokenizer of :mod:`tests.engine_fixtures` with a chat
template (ChatML with string content, or a llava-hf style one reading typed
parts, in the tokenizer or in the processor's ``chat_template.json``), and an
end-of-sequence token that greedy decoding never picks.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from assistant.engine.engine import Engine
from assistant.engine.model import ChatModel
from assistant.engine.request import (ChatMessage, EngineEvent, Finished, GenerationRequest, ImageChunk,
                                      InlineImages, TokenDelta)
from assistant.engine.sampling import SamplingParams

TEXT_HIDDEN = 64
VISION_HIDDEN = 32
VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 127
IMAGE_SIZE, PATCH_SIZE = 32, 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 4


# llava-hf/llava-1.5-*-hf's template: typed content parts only; a plain string content renders as nothing.
LLAVA_LIST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaConfig(**{**settings, **overrides})


def tiny_vision_config(tower: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config_class = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    return config_class(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def tiny_image_processor(tower: str):
    """The processor a real checkpoint of this family ships, shrunk to 32 px."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if tower == "clip":
        return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                 "width": IMAGE_SIZE})
    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_tiny_tower(path: Path, tower: str, *, with_processor: bool = True, seed: int = 0) -> Path:
    """A random CLIPVisionModel / SiglipVisionModel checkpoint directory."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    torch.manual_seed(seed)
    model_class = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[tower]
    model_class(tiny_vision_config(tower)).save_pretrained(path)
    if with_processor:
        tiny_image_processor(tower).save_pretrained(path)
    return Path(path)


def save_tiny_llava(path: Path, tower: str, select: str = "default", *, seed: int = 0) -> Path:
    """A random LlavaForConditionalGeneration (tiny CLIP or SigLIP tower, tiny Llama) with its image processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    grid_tokens = GRID**2 + int(tower == "clip") - int(select == "default")
    config = LlavaConfig(vision_config=tiny_vision_config(tower), text_config=tiny_llama_config(),
                         image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy=select, image_seq_length=grid_tokens)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    tiny_image_processor(tower).save_pretrained(path)
    return Path(path)


def load_tiny_llava_chat(tmp: Path, max_position_embeddings: int = 512) -> ChatModel:
    """:func:`save_tiny_llava_chat` (CLIP tower) in ``tmp``, loaded as ``assistant serve`` loads a model:
    unquantized (what these tests are about), float32, on CPU."""
    from assistant.config import Config
    from assistant.engine.loader import load_model

    path = save_tiny_llava_chat(tmp, "clip", max_position_embeddings=max_position_embeddings)
    config = Config(model=str(path), data_dir=path / "data", dtype="float32", device="cpu", quantize="none")
    return load_model(config, progress=lambda _: None)


def save_tiny_llava_chat(path: Path, tower: str, select: str = "default", *, template: str = "chatml",
                         template_in: str = "tokenizer", seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """A random LLaVA ready to serve: the tiny tower + Llama, a byte-level tokenizer with ``<image>``, a chat template.

    ``template``: "chatml" (string content, as tests.engine_fixtures) or "llava" (:data:`LLAVA_LIST_TEMPLATE`);
    ``template_in``: "tokenizer" (tokenizer_config / chat_template.jinja) or "processor" (only in
    ``chat_template.json``, as llava-hf checkpoints ship it, the tokenizer having none).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tests.engine_fixtures import CHAT_TEMPLATE, byte_level_tokenizer

    chat_template = {"chatml": CHAT_TEMPLATE, "llava": LLAVA_LIST_TEMPLATE}[template]
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = chat_template if template_in == "tokenizer" else None
    text_config = tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    max_position_embeddings=max_position_embeddings)
    grid_tokens = GRID**2 + int(tower == "clip") - int(select == "default")
    config = LlavaConfig(vision_config=tiny_vision_config(tower), text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy=select, image_seq_length=grid_tokens)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger decoder weights than the default init, so greedy picks are far from ties
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and not name.startswith("model.vision_tower"):
                parameter.normal_(0.0, 0.2)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0  # a logit of 0 never wins: greedy runs to the limit
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tiny_image_processor(tower).save_pretrained(path)
    if template_in == "processor":
        (Path(path) / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))
    return Path(path)


def make_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic synthetic RGB image: a gradient with a few coloured shapes."""
    generator = torch.Generator().manual_seed(seed)
    width, height = size
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    tint = torch.rand(3, generator=generator)
    rgb = torch.stack([x * tint[0], y * tint[1], (1 - x) * tint[2]], dim=-1)  # (H, W, 3)
    image = Image.fromarray((rgb * 255).to(torch.uint8).numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.6).tolist()
        w, h = (torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.4 + 4).tolist()
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
    return image


# The bytes of every image_chunk() made so far, by sha256: the tests' stand-in for the store.
STORED: dict[str, bytes] = {}
IMAGES = InlineImages(STORED)


def image_chunk(image: Image.Image, detail: str = "auto", image_format: str = "PNG", **save_options) -> ImageChunk:
    """What the session hands the engine for ``image``: a reference to its encoded bytes, which IMAGES holds."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    data = buffer.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    STORED[sha256] = data
    return ImageChunk(sha256=sha256, detail=detail)  # type: ignore[arg-type]


def generate(engine: Engine, messages: tuple[ChatMessage, ...], max_output_tokens: int = 6) -> tuple[str, Finished]:
    """One greedy request through ``engine`` (stepped on this thread): its text and its Finished event."""
    events: list[EngineEvent] = []
    request = GenerationRequest(f"r{next(_request_ids)}", messages,
                                SamplingParams(temperature=0.0, max_output_tokens=max_output_tokens),
                                image_source=IMAGES)
    engine.add_request(request, events.append)
    while engine.step():
        pass
    assert isinstance(events[-1], Finished) and events[-1].reason != "error", events[-1]
    return "".join(e.text for e in events if isinstance(e, TokenDelta)), events[-1]


_request_ids = itertools.count()
