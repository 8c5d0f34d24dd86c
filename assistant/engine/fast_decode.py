"""A lean decode step for Llama-family decoders: the same weights and cache, a fraction of the per-token overhead.

transformers' forward pass is written for every case (training, prefill, masks of
every shape, hooks, output records); a one-token decode step on a 135M model spends
more time in that machinery (thousands of small op calls and Python frames) than in
the matrix products. :class:`FastDecoder` runs the decode step of the same model
directly on its weights, for the cases the engine decodes: one new token per row,
per-row positions, left-padded rows masked. It

- fuses the q/k/v projections into one product and gate/up into another
  (:class:`FusedLinear`),
- applies rotary embeddings to queries and keys in one pass, with the model's own
  rotary module (so every rope scaling transformers knows applies),
- appends keys and values into a cache buffer with room to grow, in place, instead of
  concatenating the whole cache every step (what ``DynamicCache.update`` does): the
  transformers cache's ``keys``/``values`` stay views of that buffer, so everything
  else that reads the cache (prefix reuse, batch join/leave) sees an ordinary cache;
- attends with two batched products per layer (grouped-query heads), not the flash
  kernel meant for long queries (:meth:`FastDecoder._attend`);
- where every product is int4-cpu's own kernel, runs the whole layer loop in one
  native call (``assistant::decode_layers``, :mod:`~assistant.engine.int4_kernel`):
  the same operations, attention written out on the cache as it is.

It computes what transformers computes (same formulas, same order; tests compare
the two token for token in float32) and is used only where it applies
(:func:`FastDecoder.for_model`): a Llama, Mistral (without sliding windows) or Qwen2
decoder with SiLU MLPs whose linear layers are plain, int8-cpu or int4-cpu
(bitsandbytes layers keep transformers' path). A plain LoRA adapter on those layers
(what ``assistant train finetune`` writes) runs too, switched per step as
:meth:`ChatModel.forward` switches it: one extra pair of small products per fused
layer. It reads the weights as they are when it is built (the adapter's are copied): a
model that trains is built without it (``ChatModel(fast_decode=False)``). The room reserved
in cache buffers (a quarter of a batch's length, at least 64 positions) is not counted by
``--max-kv-bytes``. Engine thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from assistant.engine import int4_cpu, int8_cpu
from assistant.engine.int4_cpu import Int4Linear
from assistant.engine.int8_cpu import Int8Linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LINEAR_KINDS = (nn.Linear, Int8Linear, Int4Linear)
# Positions added to a cache buffer whenever it must grow: at least this many, or a quarter of its length.
MIN_GROWTH = 64


class FusedLinear:
    """Several linear layers that read the same input, as one matrix product whose output is their outputs side
    by side: float weights, int8-cpu rows and scales, or int4-cpu packed blocks are concatenated. Layers that
    cannot be joined (mixed kinds, int4 widths off the packing blocks) are called one by one."""

    def __init__(self, wrapped: Sequence[nn.Module]) -> None:
        layers = [base_layer(layer) for layer in wrapped]
        self.adapter = _fused_adapter(wrapped)  # (A, B) of a LoRA adapter on any of them, or None
        self.adapter_layers = [layer for layer in wrapped if hasattr(layer, "lora_A")] if self.adapter else []
        kinds = {type(layer) for layer in layers}
        self.kind = kinds.pop() if len(kinds) == 1 else None
        if self.kind is Int4Linear and any(layer.out_features % int4_cpu.PACK_BLOCK_ROWS for layer in layers):
            self.kind = None
        self.layers = list(layers)
        if self.kind is None or len(layers) == 1:
            self.kind = None  # a single layer's own forward is the product
            return
        biases = [layer.bias for layer in layers]
        present = [b for b in biases if b is not None]
        self.bias = None if not present else torch.cat([
            b if b is not None else torch.zeros(layer.out_features, dtype=present[0].dtype)
            for b, layer in zip(biases, layers, strict=True)])
        if self.kind is Int8Linear:
            self.weight = _share_rows(layers, "weight_int8")  # (sum out, in) int8
            self.scales = _share_rows(layers, "scales")  # (sum out,)
        elif self.kind is Int4Linear:
            self.weight = _share_rows(layers, "weight_packed")  # packed blocks of output rows
            self.scales = torch.cat([layer.scales_and_zeros for layer in layers], dim=1).contiguous()  # small
        else:
            self.weight = _share_rows(layers, "weight")  # (sum out, in)

    def __call__(self, x: torch.Tensor, adapter: bool = False) -> torch.Tensor:
        out = self._base(x)
        if adapter and self.adapter is not None:
            down, up = self.adapter  # (sum r, in), (sum out, sum r) block-diagonal, the scaling folded in
            delta = F.linear(F.linear(x.to(down.dtype), down), up)
            out = (out + delta).to(out.dtype)
        return out

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            outputs = [layer(x) for layer in self.layers]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.kind is nn.Linear:
            return F.linear(x, self.weight, self.bias)
        matmul = int8_cpu.matmul if self.kind is Int8Linear else int4_cpu.matmul
        out = matmul(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        out = out.reshape(*x.shape[:-1], -1)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)


class FastLayer:
    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv = FusedLinear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o = FusedLinear([attention.o_proj])
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.down = FusedLinear([mlp.down_proj])
        self.intermediate = mlp.gate_proj.out_features

    @property
    def parts(self) -> tuple[FusedLinear, FusedLinear, FusedLinear, FusedLinear]:
        """The layer's four products in the order they run: q/k/v, o, gate/up, down."""
        return self.qkv, self.o, self.gate_up, self.down


class FastDecoder:
    def __init__(self, decoder: nn.Module, lm_head: nn.Module, config: Any) -> None:
        self.embed = decoder.embed_tokens.weight
        self.final_norm = decoder.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.rotary = decoder.rotary_emb
        self.lm_head = lm_head
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.scale = self.head_dim ** -0.5
        self.layers = [FastLayer(layer) for layer in decoder.layers]
        self._native = self._native_layers()
        # each product's LoRA adapter (down, up) for decode_layers, None where a product has none
        parts = [part for layer in self.layers for part in layer.parts]
        self._native_adapters = ([None if part.adapter is None else part.adapter[0] for part in parts],
                                 [None if part.adapter is None else part.adapter[1] for part in parts])
        adapted = sum(1 for layer in decoder.modules() if hasattr(layer, "lora_A"))
        taken = sum(len(part.adapter_layers) for layer in self.layers for part in layer.parts)
        self._runs_adapter = adapted == taken

    @classmethod
    def for_model(cls, hf_model: Any) -> FastDecoder | None:
        """A fast decoder for ``hf_model`` (a causal LM, or a LLaVA's language model), or None where it does not
        apply: another architecture, a sliding window, bitsandbytes or otherwise wrapped layers (a peft LoRA
        layer's base layer counts as the layer; see :attr:`runs_adapter`)."""
        config = hf_model.config.get_text_config()
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or config.hidden_act != "silu":
            return None
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None  # Mistral-style sliding windows mask old positions; transformers' path handles them
        decoder, lm_head = hf_model.get_decoder(), hf_model.get_output_embeddings()
        if decoder is None or type(lm_head) not in LINEAR_KINDS:
            return None
        for layer in decoder.layers:
            linears = [*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                       *(getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))]
            if not all(type(base_layer(linear)) in LINEAR_KINDS for linear in linears):
                return None  # bitsandbytes or other wrapped layers
        return cls(decoder, lm_head, config)

    def _native_layers(self) -> tuple[list[torch.Tensor], ...] | None:
        """The layers' norms and packed weights for ``assistant::decode_layers`` (int4_kernel.cpp: this class's
        layer loop in one call, attention written out in C++ on the cache as it is), where every product is the
        int4 kernel's (its 3-d blocks: Int4Linear packs them only where the kernel runs), none has a bias and
        heads are 16 to 128 wide, a multiple of 16; else None."""
        def packed(part: FusedLinear) -> torch.Tensor | None:
            if part.kind is Int4Linear:
                weight, bias = part.weight, part.bias
            elif part.kind is None and len(part.layers) == 1 and type(part.layers[0]) is Int4Linear:
                weight, bias = part.layers[0].weight_packed, part.layers[0].bias
            else:
                return None
            return weight if weight.dim() == 3 and bias is None else None

        columns: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
        for layer in self.layers:
            weights = [packed(part) for part in layer.parts]
            if any(weight is None for weight in weights) or layer.intermediate != self.layers[0].intermediate:
                return None
            for column, tensor in zip(columns, [layer.input_norm, layer.post_norm, *weights], strict=True):
                column.append(tensor)
        return columns if self.layers and self.head_dim % 16 == 0 and self.head_dim <= 128 else None

    @property
    def runs_adapter(self) -> bool:
        """Whether every LoRA layer of the model was taken in (:func:`_fused_adapter`), so ``step(adapter=True)``
        computes what the model computes with its adapter switched on."""
        return self._runs_adapter

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None,
             cache: Any, *, reserve: bool = True, adapter: bool = False) -> torch.Tensor:
        """Feed ``token_ids`` ``(B, 1)`` at ``positions`` ``(B, 1)``; ``attention_mask`` ``(B, L + 1)`` (0 on left
        padding) or None when no row is padded. Extends ``cache`` (a transformers cache whose layers hold
        ``(B, H, L, D)`` keys and values) by one position and returns logits ``(B, vocab)`` float32.

        ``reserve``: append into buffers with room to grow (a batch that decodes on); otherwise the
        cache's tensors are exactly its length (a cache that is about to be kept). ``adapter``: with the
        model's LoRA adapter switched on (only where :attr:`runs_adapter`)."""
        if adapter and not self._runs_adapter:
            raise ValueError("this model's adapter is not one the lean step runs")
        batch = token_ids.shape[0]
        x = F.embedding(token_ids, self.embed)  # (B, 1, C)
        cos, sin = self.rotary(x, positions)  # (B, 1, D) each, in x's dtype
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        bias = None  # (B, 1, 1, L + 1): -inf on left padding
        if attention_mask is not None:
            bias = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            bias = bias.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        length = cache.layers[0].keys.shape[-2]
        if (self._native is not None and reserve
                and all(layer.keys.shape[-2] == length for layer in cache.layers)):
            buffers = [room_for_one_more(cache_layer) for cache_layer in cache.layers]
            x = torch.ops.assistant.decode_layers(
                x, *self._native, cos, sin, [keys for keys, _ in buffers], [values for _, values in buffers],
                length, bias, heads, kv_heads, self.layers[0].intermediate, self.eps, self.scale,
                *(self._native_adapters if adapter else ([], [])))
            for cache_layer, (keys, values) in zip(cache.layers, buffers, strict=True):
                cache_layer.keys, cache_layer.values = keys[..., :length + 1, :], values[..., :length + 1, :]
            x = _rms_norm(x, self.final_norm, self.eps)
            return self.lm_head(x[:, -1]).float()
        half = dim // 2
        for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
            h = _rms_norm(x, layer.input_norm, self.eps)
            qkv = layer.qkv(h, adapter).view(batch, 1, heads + 2 * kv_heads, dim)
            qkv = qkv.transpose(1, 2)  # (B, Hq + 2 Hkv, 1, D)
            qk = qkv[:, :heads + kv_heads]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # rotate_half, as transformers
            keys, values = _append(cache_layer, qk[:, heads:], qkv[:, heads + kv_heads:], reserve)
            attended = self._attend(qk[:, :heads], keys, values, bias)  # (B, Hkv, Hq / Hkv, D)
            x = x + layer.o(attended.reshape(batch, 1, heads * dim).to(x.dtype), adapter)
            h = _rms_norm(x, layer.post_norm, self.eps)
            gate_up = layer.gate_up(h, adapter)
            activated = F.silu(gate_up[..., :layer.intermediate]) * gate_up[..., layer.intermediate:]
            x = x + layer.down(activated, adapter)
        x = _rms_norm(x, self.final_norm, self.eps)
        return self.lm_head(x[:, -1]).float()  # (B, vocab)

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """Attention of one query position: ``query`` ``(B, Hq, 1, D)``, ``keys``/``values`` ``(B, Hkv, L, D)``,
        ``bias`` ``(B, 1, 1, L)`` or None; returns ``(B, Hkv, Hq / Hkv, D)``, query heads in order.

        Written out in float32 (two batched products and a softmax): for a single query position on CPU that
        is faster than ``scaled_dot_product_attention``'s flash kernel, which tiles for long queries (at 900
        cached positions 1.7× the tokens/s, at batch 8 1.2×; and bfloat16 products re-plan their kernel
        every step as the length changes). Query head h reads key/value head h // (Hq / Hkv), as
        transformers' repeat_kv does.
        """
        batch, kv_heads = query.shape[0], keys.shape[1]
        grouped = query.reshape(batch, kv_heads, -1, self.head_dim).float()  # (B, Hkv, G, D)
        scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(self.scale)  # (B, Hkv, G, L)
        if bias is not None:
            scores = scores + bias
        return torch.matmul(scores.softmax(dim=-1), values.float())  # (B, Hkv, G, D) float32


def _append(cache_layer: Any, key: torch.Tensor, value: torch.Tensor,
            reserve: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one position (``(B, Hkv, 1, D)`` each) to a transformers cache layer; return its keys and values
    ``(B, Hkv, L + 1, D)``. With ``reserve`` they are views of buffers with room to grow, kept on the layer."""
    keys, values = cache_layer.keys, cache_layer.values
    if not reserve:
        cache_layer.keys, cache_layer.values = torch.cat([keys, key], dim=-2), torch.cat([values, value], dim=-2)
        return cache_layer.keys, cache_layer.values
    length = keys.shape[-2]
    key_buffer, value_buffer = room_for_one_more(cache_layer)
    key_buffer[..., length, :] = key[..., 0, :]
    value_buffer[..., length, :] = value[..., 0, :]
    cache_layer.keys, cache_layer.values = key_buffer[..., :length + 1, :], value_buffer[..., :length + 1, :]
    return cache_layer.keys, cache_layer.values


def room_for_one_more(cache_layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value buffers ``(B, Hkv, capacity, D)`` whose first L positions are the cache layer's keys and
    values (which are views of them) and which have room for position L: the ones kept on the layer, or new ones
    (a quarter of L more, at least :data:`MIN_GROWTH`) with the cache copied in."""
    keys, values = cache_layer.keys, cache_layer.values
    length = keys.shape[-2]
    buffers = getattr(cache_layer, "assistant_buffers", None)
    if (buffers is None or buffers[0].shape[-2] <= length
            or not _is_prefix_view(keys, buffers[0]) or not _is_prefix_view(values, buffers[1])):
        capacity = length + max(MIN_GROWTH, length // 4)
        buffers = tuple(torch.empty((*t.shape[:-2], capacity, t.shape[-1]), dtype=t.dtype, device=t.device)
                        for t in (keys, values))
        buffers[0][..., :length, :] = keys
        buffers[1][..., :length, :] = values
        cache_layer.assistant_buffers = buffers
    return buffers


def _fused_adapter(layers: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA adapter on ``layers`` (peft ``LoraLayer`` s wrapping some of them) as one down projection
    ``(sum r, in)`` and one block-diagonal up projection ``(sum out, sum r)`` with each layer's scaling folded
    in, so ``up(down(x))`` is every layer's ``lora_B(lora_A(x)) * scaling`` side by side (zero for a layer
    without one). None when no layer has one, or one has what this does not compute (several active adapters,
    DoRA or another variant)."""
    downs, ups, widths, ranks = [], [], [], []
    for layer in layers:
        out_features = base_layer(layer).out_features
        names = list(getattr(layer, "active_adapters", ())) if hasattr(layer, "lora_A") else []
        names = [name for name in names if name in layer.lora_A]
        if len(names) > 1 or names and names[0] in getattr(layer, "lora_variant", {}):
            return None
        if names:
            name = names[0]
            downs.append(layer.lora_A[name].weight)
            ups.append(layer.lora_B[name].weight * layer.scaling[name])
        else:
            downs.append(None)
            ups.append(None)
        widths.append(out_features)
        ranks.append(0 if downs[-1] is None else downs[-1].shape[0])
    present = [d for d in downs if d is not None]
    if not present:
        return None
    dtype, device = present[0].dtype, present[0].device
    down = torch.cat(present)  # (sum r, in)
    up = torch.zeros(sum(widths), sum(ranks), dtype=dtype, device=device)
    row = column = 0
    for width, rank, block in zip(widths, ranks, ups, strict=True):
        if block is not None:
            up[row:row + width, column:column + rank] = block
        row, column = row + width, column + rank
    return down.detach(), up.detach()


def _share_rows(layers: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The layers' tensors ``name`` concatenated along their first dimension; each layer's own becomes a view of
    its rows of the result, so the fused copy costs no memory."""
    fused = torch.cat([getattr(layer, name) for layer in layers]).contiguous()
    start = 0
    for layer in layers:
        own = getattr(layer, name)
        view = fused[start:start + own.shape[0]]
        start += own.shape[0]
        if isinstance(own, nn.Parameter):
            setattr(layer, name, nn.Parameter(view, requires_grad=own.requires_grad))
        else:
            setattr(layer, name, view)  # a registered buffer: assignment replaces it
    return fused


def base_layer(layer: nn.Module) -> nn.Module:
    """The layer a peft LoRA layer wraps (the fast path runs with the adapter off), or the layer itself."""
    return getattr(layer, "base_layer", layer)


def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` is ``buffer[..., :n, :]`` for some n (so appending at n writes into ``buffer``)."""
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.shape[:-2] == buffer.shape[:-2]
            and tensor.stride() == buffer.stride())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
