"""Tiny, local, random-weight models and tokenizers for the engine tests (no hub, no pulled model).

- :func:`byte_level_tokenizer`: a GPT-2-style byte-level BPE trained in memory on a
  few sentences with emoji and CJK, so multi-byte characters split across tokens;
- :func:`sentencepiece_tokenizer`: a Llama-style BPE with "▁" word prefixes,
  byte-fallback tokens (``<0xF0>``) and the stripping decoder;
- :func:`save_tiny_chat_model`: a 2-layer random Llama plus the byte-level
  tokenizer with a ChatML template, saved to a directory for ``load_chat_model``;
  at its default width nf4 runs on every CPU (see :mod:`assistant.engine.quantize`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from assistant.engine.request import ChatMessage, TextChunk

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Emoji 🙂 and 🚀 are fun! 你好，世界。日本語もある。",
    "The user asks a question and the assistant answers it politely.",
    "What is the capital of France? Paris is the capital of France.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(CORPUS[:1] * 4, trainer)
    state = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in state["merges"]],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_chat_model(directory: Path, *, seed: int = 0, max_position_embeddings: int = 256,
                         hidden_size: int = 64, never_ends: bool = False) -> Path:
    """A random 2-layer Llama (4 heads, 2 KV heads, MLP twice ``hidden_size``) + byte-level tokenizer, saved as a
    local model dir. At the default width every Linear but lm_head is a multiple of 32 wide, as nf4 on CPU needs.
    ``never_ends``: the logits of the end-of-turn token and of the NUL byte are always 0, below the best of 300
    random ones, so greedy decoding runs until the output cap or the context is full, with text any database can
    store (PostgreSQL's text holds no NUL)."""
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy picks are far from ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
        if never_ends:
            nul = tokenizer.convert_tokens_to_ids("\u0100")  # byte 0 as the byte-level alphabet spells it
            model.lm_head.weight[[tokenizer.eos_token_id, nul]] = 0.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def user(text: str) -> ChatMessage:
    return ChatMessage("user", (TextChunk(text),))


def message(role: str, text: str) -> ChatMessage:
    return ChatMessage(role, (TextChunk(text),))  # type: ignore[arg-type]


class FakeVision:
    """A stand-in vision part: ``num_tokens`` positions per image ("low": one), each row = mean pixel / 255."""

    def __init__(self, hidden_size: int, num_tokens: int = 3) -> None:
        self.hidden_size = hidden_size
        self.high_tokens = num_tokens
        self.identity = f"fake-vision:{hidden_size}:{num_tokens}"

    def preprocess_key(self, detail: str) -> str:
        return f"{self.num_tokens(detail)}t"

    def num_tokens(self, detail: str) -> int:
        return 1 if detail == "low" else self.high_tokens

    def encode(self, images: list[Image.Image], detail: str) -> torch.Tensor:
        means = torch.tensor([sum(image.convert("L").tobytes()) / (255.0 * image.width * image.height)
                              for image in images])  # (N,)
        return means[:, None, None].expand(len(images), self.num_tokens(detail), self.hidden_size).clone()


def png(gray: int, size: int = 4) -> bytes:
    """A small solid-gray PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (gray, gray, gray)).save(buffer, format="PNG")
    return buffer.getvalue()
