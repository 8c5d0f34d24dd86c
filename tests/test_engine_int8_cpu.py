"""--quantize int8-cpu: weight-only int8 on PyTorch's CPU kernel (the engine's equalities run on it too, in
tests/test_engine_batch.py and tests/test_engine_prefix_cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from assistant.config import load_config
from assistant.engine.int4_cpu import Int4Linear
from assistant.engine.int8_cpu import Int8Linear, is_supported
from assistant.engine.loader import attach_adapter, convert_on_cpu, load_chat_model
from tests.engine_fixtures import save_tiny_chat_model


def test_int8_linear_is_close_to_the_float_layer_and_batch_invariant() -> None:
    assert is_supported()
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    quantized = Int8Linear(linear, torch.float32)
    x = torch.randn(5, 3, 64)
    expected = linear(x)
    got = quantized(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert torch.equal(quantized(x[2:3])[0], got[2])  # a row does not depend on the others
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight.shape == linear.weight.shape


def test_the_decoder_layers_are_converted_and_nothing_else(tmp_path: Path) -> None:
    model = load_chat_model(str(save_tiny_chat_model(tmp_path / "tiny")), dtype="float32", quantize="int8-cpu")
    modules = dict(model.hf_model.named_modules())
    converted = [name for name, module in modules.items() if isinstance(module, Int8Linear)]
    assert len(converted) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert type(modules["lm_head"]) is nn.Linear
    assert not [name for name, module in modules.items() if type(module) is nn.Linear and name != "lm_head"]


@pytest.mark.parametrize("kind", ["int8-cpu", "int4-cpu"])
def test_a_lora_adapter_keeps_its_own_layers_in_float(tmp_path: Path, kind: str) -> None:
    """Both CPU converters (int4-cpu's too) convert an adapter's base layers and leave its own in float."""
    from peft import LoraConfig, get_peft_model

    source = save_tiny_chat_model(tmp_path / "tiny")
    base = load_chat_model(str(source), dtype="float32").hf_model
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = load_chat_model(str(source), dtype="float32").hf_model
    with_adapter = attach_adapter(fresh, tmp_path / "adapter", merge=False)
    convert_on_cpu(with_adapter, kind, torch.float32)
    converted = Int8Linear if kind == "int8-cpu" else Int4Linear
    names = {name: type(module) for name, module in with_adapter.named_modules()}
    assert names["model.layers.0.self_attn.q_proj.base_layer"] is converted
    assert names["model.layers.0.self_attn.q_proj.lora_A.default"] is nn.Linear
    assert names["model.layers.0.mlp.up_proj"] is converted


def test_config_accepts_it() -> None:
    assert load_config({"quantize": "int8-cpu"}, env={}).quantize == "int8-cpu"
    with pytest.raises(Exception, match="quantize"):
        load_config({"quantize": "int3"}, env={})
