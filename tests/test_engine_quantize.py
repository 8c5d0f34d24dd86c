"""bitsandbytes on tiny random LLaVA checkpoints: the decoder quantized, the vision half untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from assistant.engine.quantize import (LLAVA_SKIP_MODULES, check_packed_cpu_widths, quantization_config,
                                       quantized_modules, skip_modules_for)
from assistant.engine.vision import LlavaVision, load_image_processor
from tests.vision_fixtures import IMAGE_TOKEN_ID, TEXT_HIDDEN, make_image, save_tiny_llava, tiny_llama_config

bnb = pytest.importorskip("bitsandbytes")

VISION_PREFIXES = ["model.vision_tower", "model.multi_modal_projector"]


def load_quantized(path, kind: str, skip_modules: list[str], device_map: str = "cpu"):
    from transformers import LlavaForConditionalGeneration

    config = quantization_config(kind, skip_modules=skip_modules, compute_dtype=torch.float32)
    return LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config, device_map=device_map,
                                                         dtype=torch.float32).eval()


def modules_under(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if name.startswith(prefix + ".")]


def prompt_with_image(vision: LlavaVision) -> torch.Tensor:
    return torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * vision.num_tokens("high") + [7]])  # (1, L)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_skip_modules_are_real_module_paths(tmp_path, tower):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(save_tiny_llava(tmp_path, tower))
    names = {name for name, _ in model.named_modules()}

    assert skip_modules_for(model.config) == list(LLAVA_SKIP_MODULES)
    assert set(LLAVA_SKIP_MODULES) <= names


def test_plain_causal_lms_keep_only_lm_head():
    assert skip_modules_for(tiny_llama_config()) == ["lm_head"]


def test_quantization_config_kinds():
    assert quantization_config("none", skip_modules=[]) is None
    nf4 = quantization_config("nf4", skip_modules=list(LLAVA_SKIP_MODULES), compute_dtype=torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert nf4.llm_int8_skip_modules == list(LLAVA_SKIP_MODULES)
    int8 = quantization_config("int8", skip_modules=["lm_head"])
    assert int8.load_in_8bit and int8.llm_int8_skip_modules == ["lm_head"]
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantization_config("fp8", skip_modules=[])


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_nf4_quantizes_the_decoder_only_and_still_runs(tmp_path, tower):
    path = save_tiny_llava(tmp_path, tower, select="default" if tower == "clip" else "full")
    model = load_quantized(path, "nf4", skip_modules_for_path(path))

    decoder_linears = [m for _, m in modules_under(model, "model.language_model") if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears)
    assert quantized_modules(model, VISION_PREFIXES + ["lm_head"]) == []
    vision_modules = [m for prefix in VISION_PREFIXES for _, m in modules_under(model, prefix)]
    assert any(type(m) is nn.Linear for m in vision_modules)
    assert any(type(m) is nn.Conv2d for m in vision_modules)  # the patch embedding
    assert type(model.lm_head) is nn.Linear

    vision = LlavaVision(model, load_image_processor(str(path)))
    images = [make_image(0)]
    input_ids = prompt_with_image(vision)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)  # (1, L, h)
        embeds[input_ids == IMAGE_TOKEN_ID] = vision.encode(images, "high").reshape(-1, TEXT_HIDDEN)
        logits = model(inputs_embeds=embeds).logits
        pixel_values = vision.image_processor(images=images, return_tensors="pt")["pixel_values"]
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3,
                                   min_new_tokens=3, do_sample=False)
    assert logits.shape == (1, input_ids.shape[1], 128) and torch.isfinite(logits).all()
    assert generated.shape == (1, input_ids.shape[1] + 3)


def test_bare_module_names_would_quantize_the_vision_tower(tmp_path):
    """Why the paths must be full: bitsandbytes skips by prefix of the full path (or whole-name suffix)."""
    model = load_quantized(save_tiny_llava(tmp_path, "clip"), "nf4",
                           ["vision_tower", "multi_modal_projector", "lm_head"])
    assert quantized_modules(model, ["model.vision_tower"]) != []


def test_int8_quantizes_the_decoder_only(tmp_path):
    path = save_tiny_llava(tmp_path, "clip")
    model = load_quantized(path, "int8", skip_modules_for_path(path))

    decoder_linears = [m for _, m in modules_under(model, "model.language_model") if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, bnb.nn.Linear8bitLt) for m in decoder_linears)
    assert quantized_modules(model, VISION_PREFIXES + ["lm_head"]) == []
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def nf4_llama(path, **overrides) -> nn.Module:
    """A tiny random Llama (``tiny_llama_config(**overrides)``) loaded with nf4, lm_head unquantized."""
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(path)
    config = quantization_config("nf4", skip_modules=["lm_head"], compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)


def test_the_packed_cpu_kernel_refuses_layers_it_cannot_run(tmp_path):
    """Width 48: q/o 48 and k/v 24 wide (4 heads, 2 KV heads) are not multiples of 32; lm_head is not quantized."""
    model = nf4_llama(tmp_path, hidden_size=48, intermediate_size=96, vocab_size=100)

    with pytest.raises(RuntimeError, match=r"e\.g\. model\.layers\.0\.self_attn\.q_proj \(in 48, out 48\), "
                                           r"model\.layers\.0\.self_attn\.k_proj \(in 48, out 24\), "
                                           r"model\.layers\.0\.self_attn\.v_proj \(in 48, out 24\)\. "
                                           r"Use --quantize none") as refused:
        check_packed_cpu_widths(model, is_packed=True)
    assert "lm_head" not in str(refused.value)
    check_packed_cpu_widths(model, is_packed=False)  # the other kernels take any width


def test_the_packed_cpu_kernel_needs_an_even_input_width():
    model = nn.Sequential(bnb.nn.Linear4bit(63, 64))

    with pytest.raises(RuntimeError, match=r"1 layers are not, e\.g\. 0 \(in 63, out 64\)"):
        check_packed_cpu_widths(model, is_packed=True)


def test_the_tiny_fixtures_fit_the_packed_cpu_kernel(tmp_path):
    check_packed_cpu_widths(nf4_llama(tmp_path), is_packed=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_on_cuda_keeps_vision_unquantized_and_matches_encode(tmp_path):
    path = save_tiny_llava(tmp_path, "clip")
    model = load_quantized(path, "nf4", skip_modules_for_path(path), device_map="cuda")
    assert quantized_modules(model, VISION_PREFIXES + ["lm_head"]) == []

    vision = LlavaVision(model, load_image_processor(str(path)))
    embeddings = vision.encode([make_image(0)], "high")
    assert embeddings.device.type == "cuda" and embeddings.shape == (1, vision.num_tokens("high"), TEXT_HIDDEN)
    input_ids = prompt_with_image(vision).cuda()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        embeds[input_ids == IMAGE_TOKEN_ID] = embeddings.reshape(-1, TEXT_HIDDEN).to(embeds.dtype)
        assert torch.isfinite(model(inputs_embeds=embeds).logits).all()


def skip_modules_for_path(path) -> list[str]:
    from transformers import AutoConfig

    return skip_modules_for(AutoConfig.from_pretrained(path))
