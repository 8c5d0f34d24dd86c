"""load_model: every kind of ``--model`` on tiny random checkpoints saved in tmp_path (never the hub)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import assistant.engine.loader as loader_module
from assistant.config import Config
from assistant.engine.cache import EmbeddingCache
from assistant.engine.engine import Engine
from assistant.engine.loader import load_model, pick_device, pick_dtype
from assistant.engine.model import ChatModel, template_content_format
from assistant.engine.quantize import quantization_config, quantized_modules
from assistant.engine.request import ChatMessage, TextChunk
from assistant.engine.vision import EfficientNetVision, LlavaVision, Projector, save_projector
from assistant.models import default_data_dir
from tests.engine_fixtures import CHAT_TEMPLATE, byte_level_tokenizer, message, save_tiny_chat_model
from tests.vision_fixtures import GRID, LLAVA_LIST_TEMPLATE, generate, image_chunk, make_image, save_tiny_llava_chat

VISION_PREFIXES = ("model.vision_tower", "model.multi_modal_projector")
CACHE_BYTES = 1 << 20


def config(model: str | Path, data_dir: Path, **overrides: object) -> Config:
    settings = {"dtype": "float32", "device": "cpu", "quantize": "none", "image_cache_bytes": CACHE_BYTES,
                **overrides}
    return Config(model=str(model), data_dir=data_dir, **settings)  # type: ignore[arg-type]


def load(model: str | Path, data_dir: Path, **overrides: object) -> ChatModel:
    return load_model(config(model, data_dir, **overrides), progress=lambda _: None)


def look_at(seed: int = 1, detail: str = "auto") -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", (TextChunk("What is in this picture?"), image_chunk(make_image(seed), detail))),)


def modules_under(model: nn.Module, prefix: str) -> list[nn.Module]:
    return [module for name, module in model.named_modules() if name.startswith(prefix + ".")]


def save_composition(path: Path, *, projector_width: int = 64) -> Path:
    """model.toml: the tiny chat Llama (hidden 64) + EfficientNet-Lite0 + a random 1280 → width projector."""
    save_tiny_chat_model(path / "decoder")
    torch.manual_seed(0)
    save_projector(Projector("mlp2x_gelu", 1280, projector_width), path / "projector")
    toml = path / "model.toml"
    toml.write_text('decoder = "decoder"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\n')
    return toml


# ------------------------------------------------------------ causal LMs


def test_a_causal_lm_directory_is_a_text_only_model(tmp_path: Path) -> None:
    model = load(save_tiny_chat_model(tmp_path / "llama"), tmp_path, dtype="auto")

    assert type(model.hf_model).__name__ == "LlamaForCausalLM"
    assert not model.accepts_images
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16  # "auto" on CPU
    with pytest.raises(ValueError, match="no vision part"):
        model.num_image_tokens("high")
    text, finished = generate(Engine(model), (message("user", "Hello"),))
    assert finished.num_output_tokens == 6 and finished.num_image_tokens == finished.num_cached_image_tokens == 0


def test_an_unreachable_hub_id_says_to_pass_a_local_directory(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    with pytest.raises(RuntimeError, match="local model directory"):
        load("someone/not-a-local-path", tmp_path)


def test_auto_device_and_dtype() -> None:
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cuda:1") == "cuda:1"
    assert pick_dtype("auto", "cpu") == "bfloat16"
    assert pick_dtype("float16", "cpu") == "float16"


# ------------------------------------------------------------ LLaVA checkpoints


@pytest.mark.parametrize(("tower", "num_high", "num_low"), [
    ("clip", GRID**2, 4),  # CLS dropped: the 4 × 4 grid, pooled to 2 × 2 at low detail
    ("siglip", GRID**2 - 1, GRID**2 - 1),  # "default" drops a patch: no grid left to pool
])
def test_a_llava_checkpoint_is_decoder_and_vision_part_in_one(tmp_path: Path, tower: str, num_high: int,
                                                              num_low: int) -> None:
    model = load(save_tiny_llava_chat(tmp_path / "llava", tower), tmp_path)

    assert type(model.hf_model).__name__ == "LlavaForConditionalGeneration"
    assert isinstance(model.vision, LlavaVision) and model.vision.model is model.hf_model  # one model, not two
    assert isinstance(model.image_cache, EmbeddingCache) and model.image_cache.max_bytes == CACHE_BYTES
    assert (model.num_image_tokens("high"), model.num_image_tokens("auto"), model.num_image_tokens("low")) == (
        num_high, num_high, num_low)
    assert model.content_format == "string"  # the ChatML template reads string content

    text, finished = generate(Engine(model), look_at())
    assert finished.num_output_tokens == 6 and text
    assert finished.num_image_tokens == num_high and finished.num_cached_image_tokens == 0


@pytest.mark.parametrize("template_in", ["tokenizer", "processor"])
def test_a_llava_hf_template_gets_list_content(tmp_path: Path, template_in: str) -> None:
    """llava-hf templates read typed parts only (and ship in the processor's chat_template.json)."""
    model = load(save_tiny_llava_chat(tmp_path / "llava", "clip", template="llava", template_in=template_in),
                 tmp_path)

    assert model.tokenizer.chat_template == LLAVA_LIST_TEMPLATE and model.content_format == "list"
    messages = (message("user", "Hi"), message("assistant", "Hello!")) + look_at()
    prompt = model.render(messages, 1000)
    texts = [model.tokenizer.decode(s) if isinstance(s, tuple) else s.num_tokens for s in prompt.segments]
    # The LLaVA-1.5 layout: "USER: <image>\n<text> ASSISTANT:".
    assert texts == ["USER: Hi ASSISTANT: Hello! USER: ", GRID**2, "\nWhat is in this picture? ASSISTANT:"]
    _, finished = generate(Engine(model), messages)
    assert finished.num_image_tokens == GRID**2


def test_content_format_is_found_by_rendering() -> None:
    tokenizer = byte_level_tokenizer()
    either = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
              "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}")
    for template, expected in [(CHAT_TEMPLATE, "string"), (LLAVA_LIST_TEMPLATE, "list"), (either, "string"),
                               ("{{ raise_exception('no') }}", "string")]:
        tokenizer.chat_template = template
        assert template_content_format(tokenizer) == expected, template


# ------------------------------------------------------------ compositions


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
def test_a_composition_file_joins_efficientnet_a_projector_and_a_causal_lm(tmp_path: Path) -> None:
    model = load(save_composition(tmp_path), default_data_dir())

    assert type(model.hf_model).__name__ == "LlamaForCausalLM"
    assert isinstance(model.vision, EfficientNetVision) and model.vision.hidden_size == model.hidden_size == 64
    assert isinstance(model.image_cache, EmbeddingCache) and model.image_cache.max_bytes == CACHE_BYTES
    assert (model.num_image_tokens("high"), model.num_image_tokens("low")) == (49, 16)
    _, finished = generate(Engine(model), look_at(detail="low"))
    assert finished.num_output_tokens == 6 and finished.num_image_tokens == 16


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
def test_a_projector_of_the_wrong_width_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.toml: the projector maps image features to width 48, but the "
                                         r"decoder .* has hidden size 64"):
        load(save_composition(tmp_path, projector_width=48), default_data_dir())


# ------------------------------------------------------------ quantization


def test_nf4_quantizes_the_llava_decoder_only_and_still_generates(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = load(save_tiny_llava_chat(tmp_path / "llava", "clip"), tmp_path, quantize="nf4", dtype="bfloat16")
    hf_model = model.hf_model

    decoder_linears = [m for m in modules_under(hf_model, "model.language_model") if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears)
    vision_modules = [m for prefix in VISION_PREFIXES for m in modules_under(hf_model, prefix)]
    assert any(type(m) is nn.Linear for m in vision_modules)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in vision_modules)
    assert type(hf_model.lm_head) is nn.Linear

    text, finished = generate(Engine(model), look_at())
    assert finished.num_output_tokens == 6 and text and finished.num_image_tokens == GRID**2


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
def test_nf4_composition_quantizes_the_decoder_not_the_vision_part(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = load(save_composition(tmp_path), default_data_dir(), quantize="nf4", dtype="bfloat16")

    decoder_linears = [m for m in modules_under(model.hf_model, "model") if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears)
    assert isinstance(model.vision, EfficientNetVision)
    vision_modules = list(model.vision.backbone.modules()) + list(model.vision.projector.modules())
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in vision_modules)
    _, finished = generate(Engine(model), look_at(detail="low"))
    assert finished.num_output_tokens == 6 and finished.num_image_tokens == 16


def test_a_vision_module_quantized_anyway_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If bitsandbytes ever stops honouring the skip paths, loading fails instead of serving a broken tower."""
    def bare_names(kind: str, *, skip_modules: list[str], compute_dtype: torch.dtype) -> object:
        return quantization_config(kind, skip_modules=[name.rsplit(".", 1)[-1] for name in skip_modules],
                                   compute_dtype=compute_dtype)

    monkeypatch.setattr(loader_module, "quantization_config", bare_names)
    with pytest.raises(RuntimeError, match=r"must stay unquantized, e\.g\. model\.vision_tower\."):
        load(save_tiny_llava_chat(tmp_path / "llava", "clip"), tmp_path, quantize="nf4", dtype="bfloat16")


def test_nf4_on_a_cpu_with_the_packed_kernel_refuses_widths_it_cannot_run(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at load time, naming the layers, on every CPU: the AVX512-BF16 probe is forced on."""
    import bitsandbytes.functional

    path = save_tiny_chat_model(tmp_path / "llama", hidden_size=48)
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    with pytest.raises(RuntimeError, match=r"multiples? of 32 .* e\.g\. model\.layers\.0\.self_attn\.q_proj "
                                           r"\(in 48, out 48\).* Use --quantize none"):
        load(path, tmp_path, quantize="nf4", dtype="bfloat16")

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: False)  # other CPUs run any width
    assert load(path, tmp_path, quantize="nf4", dtype="bfloat16").hf_model.config.hidden_size == 48


def test_int8_on_cpu_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="assistant.engine.loader"):
        model = load(save_tiny_llava_chat(tmp_path / "llava", "clip"), tmp_path, quantize="int8")

    assert any("int8" in record.getMessage() for record in caplog.records)
    decoder_linears = [m for m in modules_under(model.hf_model, "model.language_model") if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, bnb.nn.Linear8bitLt) for m in decoder_linears)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt)
                   for prefix in VISION_PREFIXES for m in modules_under(model.hf_model, prefix))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_llava_on_cuda_generates_with_images(tmp_path: Path) -> None:
    model = load(save_tiny_llava_chat(tmp_path / "llava", "clip"), tmp_path, quantize="nf4", dtype="float16",
                 device="cuda")

    assert model.device.type == "cuda" and quantized_modules(model.hf_model, list(VISION_PREFIXES)) == []
    engine = Engine(model)
    first, finished = generate(engine, look_at())
    again, cached = generate(engine, look_at())
    assert finished.num_image_tokens == cached.num_cached_image_tokens == GRID**2 and first == again
