"""A tiny model where the image clearly matters, built by hand, for the image–text matching tests.

No projector is trained yet, so no random model ranks captions meaningfully. This
one does by construction:

- :func:`save_bag_of_words_model` writes a real one-layer ``LlamaForCausalLM`` whose
  weights are set so that **a token is likelier the more often it occurs earlier in
  the context**: queries and keys are zero (every position attends uniformly to all
  the positions before it), values and output are the identity, the MLP adds
  nothing, the input embeddings are tiny (so the residual is negligible) and the
  output head holds the same directions, large. Random 256-wide directions are
  nearly orthogonal, so the logit of token t is about ``SHARPNESS * count(t) / |counts|``.
- :class:`CaptionVision` is a stub vision part that "sees" a solid-colour image as
  its caption: the image's rows are the input embeddings of the caption's tokens.

So with a red image ahead of the question, "a red square" gets likelier and other
captions less likely: the true caption ranks first, with a positive score.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from assistant.engine.cache import EmbeddingCache
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from tests.engine_fixtures import byte_level_tokenizer

HIDDEN = 256
SHARPNESS = 12.0
NUM_IMAGE_TOKENS = 12
CAPTIONS = {(255, 0, 0): "a red square", (0, 160, 0): "green grass", (0, 0, 255): "the blue sky"}


def save_bag_of_words_model(directory: Path, seed: int = 0) -> Path:
    """The hand-set one-layer Llama described in the module docstring, with the ChatML byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=HIDDEN, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(tokenizer), HIDDEN, generator=generator)  # (V, C), rows of RMS about 1
    layer = model.model.layers[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(0.01 * directions)
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            projection.weight.zero_()
        for projection in (layer.self_attn.v_proj, layer.self_attn.o_proj):
            projection.weight.copy_(torch.eye(HIDDEN))
        model.lm_head.weight.copy_(directions * (SHARPNESS / HIDDEN))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class CaptionVision:
    """A stub vision part: a solid-colour image of :data:`CAPTIONS` becomes the embeddings of its caption's tokens,
    repeated over ``NUM_IMAGE_TOKENS`` rows; any other image becomes zeros."""

    def __init__(self, hf_model: LlamaForCausalLM, tokenizer: Any) -> None:
        self.embeddings = hf_model.get_input_embeddings().weight.detach()  # (V, C)
        self.tokenizer = tokenizer
        self.hidden_size = self.embeddings.shape[1]
        self.identity = "caption-vision"

    def num_tokens(self, detail: str) -> int:
        return NUM_IMAGE_TOKENS

    def preprocess_key(self, detail: str) -> str:
        return "solid-colour"

    def encode(self, images: list[Image.Image], detail: str) -> torch.Tensor:
        rows = []
        for image in images:
            caption = CAPTIONS.get(image.convert("RGB").getpixel((image.width // 2, image.height // 2)))
            if caption is None:
                rows.append(torch.zeros(NUM_IMAGE_TOKENS, self.hidden_size))
                continue
            ids = self.tokenizer.encode(caption, add_special_tokens=False)
            repeated = (ids * NUM_IMAGE_TOKENS)[:NUM_IMAGE_TOKENS]
            rows.append(self.embeddings[repeated])  # (NUM_IMAGE_TOKENS, C)
        return torch.stack(rows)  # (N, NUM_IMAGE_TOKENS, C)


def bag_of_words_chat_model(directory: Path) -> ChatModel:
    """The saved bag-of-words Llama, loaded as serving loads a decoder, with :class:`CaptionVision` as its eyes."""
    text_model = load_chat_model(str(directory), dtype="float32")
    vision = CaptionVision(text_model.hf_model, text_model.tokenizer)
    return ChatModel(text_model.hf_model, text_model.tokenizer, vision=vision, image_cache=EmbeddingCache(1 << 20))


def solid_png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()
