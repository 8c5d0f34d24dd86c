"""``--quantize int8-cpu``: weight-only int8 for the decoder's linear layers, on PyTorch's own CPU kernel.

Each ``nn.Linear`` in the decoder's transformer layers keeps its weight as int8
with one scale per output row (symmetric, ``max |w| / 127``); activations stay in
the compute dtype and ``torch._weight_int8pack_mm`` multiplies without ever
materializing the dequantized weight. This is the kernel torchao and gpt-fast use
for int8 weight-only on CPU; it is part of PyTorch (2.4 and later), so there is
nothing to build. Measured on this project's 2-core CPUs it decodes several times
faster than bitsandbytes' nf4 (``bench.decode``; README "Fast decode on CPU"), and it is
batch-invariant: a row's output does not depend on the other rows of the batch,
so batched decoding equals unbatched decoding token for token.

Not converted: ``lm_head`` (tied to the embeddings in SmolLM2), the embeddings, a
LLaVA's vision tower and projector, and a LoRA adapter's own ``lora_A`` /
``lora_B`` layers (their base layer is converted; the adapter stays in float).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KIND = "int8-cpu"
INT8_MAX = 127
SKIPPED_NAME_PARTS = ("vision_tower", "multi_modal_projector", "lora_", "lm_head")


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is int8 with a float scale per output row."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        quantized = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.register_buffer("weight_int8", quantized.contiguous())
        self.register_buffer("scales", scales.to(compute_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype),
                                                                  requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects it, e.g. peft or tests); forward never builds it."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = matmul(x.reshape(-1, self.in_features), self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scales"


def matmul(rows: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(N, in)`` times an int8 weight ``(out, in)`` with per-row ``scales``: ``(N, out)`` in the scales'
    dtype (the rows are cast to it)."""
    if rows.dtype != scales.dtype:
        rows = rows.to(scales.dtype)
    return torch._weight_int8pack_mm(rows.contiguous(), weight_int8, scales)


def quantize_int8_cpu(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the decoder's linear layers in ``model`` (in place) with :class:`Int8Linear`; how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and ".layers." in f".{name}"
               and not any(part in name for part in SKIPPED_NAME_PARTS)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent: Any = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, compute_dtype))
    return len(targets)


def is_supported() -> bool:
    """Whether this PyTorch has the CPU kernel."""
    return hasattr(torch, "_weight_int8pack_mm")
