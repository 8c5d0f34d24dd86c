"""A candidate for the decode step: the lean step's layer body under ``torch.compile``. Prints; never asserts.

    python -m bench.compiled_step [--quantize int8-cpu|int4-cpu|none] [--dtype bfloat16] [--new-tokens 64]

:class:`~assistant.engine.fast_decode.FastDecoder` runs each decoder layer as about 55
small tensor operations around four matrix products. This runs the same layer, written as
one function of its tensors (weights, norms, rotary tables, the layer's key/value buffers
and the cached length), under ``torch.compile(dynamic=True, fullgraph=True)``: one graph
that every layer shares (a graph per layer would pass the recompile limit), in which
Inductor fuses the element-wise work (norms, rotary, SiLU, residuals) into a few C++ loops;
keys and values are written in place into buffers with room to grow, as the lean step does.

It prints, for greedy decoding of one sequence (no sampling, no server): the compile time
(the first tokens), then eager and compiled tokens/s side by side in three rounds, and for
how many of the tokens the two agree (bf16 fusions round differently; in float32 they agree).
A LoRA adapter is not run here (text-only decoding).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from assistant.engine import fast_decode
from assistant.engine.fast_decode import FastDecoder, FusedLinear
from assistant.engine.int4_cpu import GROUP_SIZE, Int4Linear
from assistant.engine.int8_cpu import Int8Linear
from assistant.engine.loader import load_chat_model
from assistant.models import DEFAULT_DECODER, default_data_dir, resolve_model
from bench.decode import SHORT, prompt_of

FLOAT, INT8, INT4 = 0, 1, 2
KINDS = {nn.Linear: FLOAT, Int8Linear: INT8, Int4Linear: INT4}


def product(x: torch.Tensor, kind: int, weight: torch.Tensor, scales: torch.Tensor | None,
            bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if kind == INT8:
        assert scales is not None
        out = torch._weight_int8pack_mm(rows.to(scales.dtype).contiguous(), weight, scales)
    elif kind == INT4:
        out = torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), weight, GROUP_SIZE, scales)
    else:
        out = F.linear(rows, weight)
    out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def layer_body(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor],
               qkv: tuple[Any, ...], o: tuple[Any, ...], gate_up: tuple[Any, ...], down: tuple[Any, ...],
               key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int, kind: int,
               shape: tuple[int, int, int, int], eps: float, scale: float) -> torch.Tensor:
    """One decoder layer for one new position per row, as :meth:`FastDecoder.step` computes it (no padding
    mask, no adapter); writes the new key and value at ``length`` of the buffers."""
    heads, kv_heads, dim, intermediate = shape
    batch, half = x.shape[0], dim // 2
    h = fast_decode._rms_norm(x, norms[0], eps)
    projected = product(h, kind, *qkv).view(batch, 1, heads + 2 * kv_heads, dim).transpose(1, 2)
    qk = projected[:, :heads + kv_heads]
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
    key_buffer[:, :, length:length + 1] = qk[:, heads:]  # a slice, not an index: no recompile per length
    value_buffer[:, :, length:length + 1] = projected[:, heads + kv_heads:]
    keys, values = key_buffer[:, :, :length + 1].float(), value_buffer[:, :, :length + 1].float()
    grouped = qk[:, :heads].reshape(batch, kv_heads, -1, dim).float()
    attended = torch.matmul((torch.matmul(grouped, keys.transpose(-1, -2)) * scale).softmax(dim=-1), values)
    x = x + product(attended.reshape(batch, 1, heads * dim).to(x.dtype), kind, *o)
    h = fast_decode._rms_norm(x, norms[1], eps)
    gu = product(h, kind, *gate_up)
    return x + product(F.silu(gu[..., :intermediate]) * gu[..., intermediate:], kind, *down)


def tensors_of(fused: FusedLinear) -> tuple[int, tuple[Any, ...]]:
    """(kind, (weight, scales, bias)) of a fused or single layer."""
    if fused.kind is not None:
        return KINDS[fused.kind], (fused.weight, getattr(fused, "scales", None), fused.bias)
    (layer,) = fused.layers
    if isinstance(layer, Int8Linear):
        return INT8, (layer.weight_int8, layer.scales, layer.bias)
    if isinstance(layer, Int4Linear):
        return INT4, (layer.weight_packed, layer.scales_and_zeros, layer.bias)
    return FLOAT, (layer.weight, None, layer.bias)


class CompiledStep:
    def __init__(self, decoder: FastDecoder) -> None:
        self.decoder = decoder
        self.body = torch.compile(layer_body, dynamic=True, fullgraph=True)
        self.layers = []
        for layer in decoder.layers:
            kind, qkv = tensors_of(layer.qkv)
            parts = [tensors_of(part) for part in (layer.o, layer.gate_up, layer.down)]
            if len({kind, *(k for k, _ in parts)}) != 1:
                raise SystemExit("mixed layer kinds: not what this benchmark compiles")
            self.layers.append((kind, (layer.input_norm, layer.post_norm), qkv, *(t for _, t in parts),
                                layer.intermediate))

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        d = self.decoder
        x = F.embedding(token_ids, d.embed)
        cos, sin = d.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        for (kind, norms, qkv, o, gate_up, down, intermediate), cache_layer in zip(self.layers, cache.layers,
                                                                                    strict=True):
            length = cache_layer.keys.shape[-2]
            buffers = fast_decode.room_for_one_more(cache_layer)
            x = self.body(x, cos, sin, norms, qkv, o, gate_up, down, buffers[0], buffers[1], length, kind,
                          (d.num_heads, d.num_kv_heads, d.head_dim, intermediate), d.eps, d.scale)
            cache_layer.keys = buffers[0][..., :length + 1, :]
            cache_layer.values = buffers[1][..., :length + 1, :]
        return d.lm_head(fast_decode._rms_norm(x, d.final_norm, d.eps)[:, -1]).float()


def decode(model: Any, prompt: Any, step: Any, num_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens after ``prompt`` and tokens/s of the decode loop."""
    logits, cache = model.prefill(prompt)
    token, tokens = int(logits.argmax()), []
    started = time.perf_counter()
    for _ in range(num_tokens):
        position = torch.tensor([[cache.get_seq_length()]])
        token = int(step(torch.tensor([[token]]), position, cache).argmax())
        tokens.append(token)
    return tokens, num_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="int8-cpu", choices=("none", "int8-cpu", "int4-cpu"))
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    model = load_chat_model(resolve_model(args.model, default_data_dir()), dtype=args.dtype, quantize=args.quantize)
    if model.fast_decoder is None:
        raise SystemExit("the lean step does not apply to this model")
    eager = model.fast_decoder
    compiled = CompiledStep(eager)
    prompt = prompt_of(model, SHORT)
    started = time.perf_counter()
    decode(model, prompt, compiled, 4)
    print(f"model    {args.model} ({args.dtype}, quantize {args.quantize}), torch threads {torch.get_num_threads()}")
    print(f"compile  {time.perf_counter() - started:.1f} s (first 4 tokens)")
    for round_number in range(3):  # the first compiled round may still compile for new lengths
        expected, eager_rate = decode(model, prompt, lambda t, p, c: eager.step(t, p, None, c), args.new_tokens)
        got, compiled_rate = decode(model, prompt, compiled, args.new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), len(got))
        print(f"round {round_number + 1}  eager {eager_rate:6.1f} tok/s  compiled {compiled_rate:6.1f} tok/s  "
              f"ratio {compiled_rate / eager_rate:.2f}  same first {same}/{len(got)} tokens")


if __name__ == "__main__":
    main()
