"""--quantize int4-cpu: 4-bit weights in groups of 32 on PyTorch's CPU kernel (the engine's equalities run on it
too, in tests/test_engine_batch.py and tests/test_engine_prefix_cache.py; its LoRA case in
tests/test_engine_int8_cpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from assistant.config import load_config
from assistant.engine.int4_cpu import GROUP_SIZE, Int4Linear, is_supported, matmul, quantize_int4_cpu, quantize_weight
from assistant.engine.loader import load_chat_model
from tests.engine_fixtures import save_tiny_chat_model


def dequantized(linear: nn.Linear) -> torch.Tensor:
    """What the 4-bit codes stand for, computed here from the codes: (out, in) float32."""
    codes, scales_and_zeros = quantize_weight(linear.weight.detach())
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
    groups = codes.reshape(linear.out_features, -1, GROUP_SIZE).float()
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(linear.out_features, linear.in_features)


def test_the_codes_stand_for_the_weight_within_half_a_step() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=False)
    weight = linear.weight.detach().reshape(48, -1, GROUP_SIZE)
    step = (weight.amax(-1) - weight.amin(-1)) / 15  # (out, groups)
    error = (dequantized(linear).reshape(48, -1, GROUP_SIZE) - weight).abs()
    assert bool((error <= step[..., None] * 0.51 + 1e-3).all())  # half a step, plus bfloat16 rounding of the scale


def test_the_kernel_multiplies_by_what_the_codes_stand_for_and_rows_do_not_depend_on_each_other() -> None:
    assert is_supported()
    torch.manual_seed(0)
    linear = nn.Linear(64, 128, bias=True)
    quantized = Int4Linear(linear)
    x = torch.randn(5, 3, 64)
    reference = x.bfloat16().float() @ dequantized(linear).T + linear.bias.detach()
    got = quantized(x)
    assert got.shape == (5, 3, 128) and got.dtype == x.dtype
    assert (got - reference).abs().max() < 0.02 * reference.abs().max()  # bfloat16 products
    assert torch.equal(quantized(x[2:3])[0], got[2])
    assert torch.allclose(quantized.weight, dequantized(linear), atol=1e-2)


def test_packed_weights_of_whole_blocks_concatenate_into_one_product() -> None:
    """fast_decode fuses q/k/v and gate/up by concatenating packed rows: valid for widths that are multiples of 64
    (PyTorch's layout; the project's kernel's, of 16)."""
    torch.manual_seed(0)
    first, second = Int4Linear(nn.Linear(64, 128, bias=False)), Int4Linear(nn.Linear(64, 64, bias=False))
    packed = torch.cat([first.weight_packed, second.weight_packed])
    scales = torch.cat([first.scales_and_zeros, second.scales_and_zeros], dim=1)
    x = torch.randn(3, 64)
    assert torch.equal(matmul(x, packed, scales).to(x.dtype), torch.cat([first(x), second(x)], dim=-1))


def test_the_decoder_layers_and_the_output_head_are_converted_not_the_embeddings(tmp_path: Path) -> None:
    source = save_tiny_chat_model(tmp_path / "tiny")
    plain = load_chat_model(str(source), dtype="float32").hf_model
    model = load_chat_model(str(source), dtype="float32", quantize="int4-cpu").hf_model
    modules = dict(model.named_modules())
    converted = [name for name, module in modules.items() if isinstance(module, Int4Linear)]
    widths_fit = model.config.vocab_size % 16 == 0
    assert len(converted) == 2 * 7 + widths_fit  # 2 layers x (q, k, v, o, gate, up, down) (+ lm_head)
    assert not [name for name, module in modules.items() if type(module) is nn.Linear and name != "lm_head"]
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)


def test_a_tied_output_head_is_converted_as_a_copy() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    quantize_int4_cpu(model)
    assert isinstance(model.lm_head, Int4Linear)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # lookups stay exact


def test_a_layer_the_kernel_cannot_take_is_refused_by_name_and_skipped_by_the_converter() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(nn.Linear(40, 64))
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(40, 64), nn.Linear(64, 64)])
    assert quantize_int4_cpu(model) == 1
    assert type(model.layers[0]) is nn.Linear and type(model.layers[1]) is Int4Linear


def test_config_accepts_it() -> None:
    assert load_config({"quantize": "int4-cpu"}, env={}).quantize == "int4-cpu"
