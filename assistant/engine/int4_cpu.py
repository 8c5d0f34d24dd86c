"""``--quantize int4-cpu``: weight-only 4-bit for the decoder's linear layers and its output head, on CPU.

Each converted ``nn.Linear`` keeps its weight as 4-bit codes in groups of
:data:`GROUP_SIZE` input columns, each group with its own scale and minimum
(asymmetric: ``w ≈ q * scale + min``, ``q`` in 0..15), the format of llama.cpp's
Q4_1, and multiplies without ever materializing the dequantized weight, with one of two
kernels:

- on CPUs with AVX512-VNNI, the project's own (:mod:`~assistant.engine.int4_kernel`,
  built on first use): the inputs rounded to int8 per group of 32, as llama.cpp does,
  and multiplied with the codes in integers; 2.5× PyTorch's kernel for one row and
  3.8× for eight, which is what makes batches of conversations pay;
- elsewhere (or when it cannot be built) ``torch._weight_int4pack_mm_for_cpu`` (the
  kernel torchao uses for int4 weight-only on CPU; part of PyTorch), which computes in
  bfloat16 (in float32 it is twenty times slower).

Either way activations are cast to bfloat16 before each product, whatever ``--dtype``
says, and a row's output does not depend on the other rows of the batch, so batched
decoding equals unbatched decoding.

Why it exists: decoding a small model on a CPU reads every weight once per token, so
time per token follows the weights' bytes. At half int8-cpu's bytes, and with the
output head (a quarter of SmolLM2-135M's weights, tied to the embeddings) converted
too, it is the fastest decode this project measured on its 2-core CPUs
(``bench.quantize``, README "Fast decode on CPU").

Converted: every ``nn.Linear`` in the decoder's transformer layers (a LoRA adapter's
base layers included, its own ``lora_A``/``lora_B`` not), and ``lm_head`` (as a copy:
tied input embeddings stay as they are, embedding lookups are exact). Not converted:
a LLaVA's vision tower and projector, and any layer the kernel cannot take (input
width not a multiple of :data:`GROUP_SIZE`, output width not a multiple of 16),
which stays as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from assistant.engine import int4_kernel

KIND = "int4-cpu"
GROUP_SIZE = 32
LEVELS = 15  # 4-bit codes 0..15
ZERO_CODE = 8  # both kernels compute (q - 8) * scale + zero
SKIPPED_NAME_PARTS = ("vision_tower", "multi_modal_projector", "lora_")
# PyTorch's packed layout is laid out in blocks of this many output rows (the project's kernel in blocks of
# 16): packed weights of layers whose widths are multiples of it can be concatenated into one (fast_decode
# fuses q/k/v and gate/up that way).
PACK_BLOCK_ROWS = 64
COMPUTE_DTYPE = torch.bfloat16


def can_convert(linear: nn.Linear) -> bool:
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is 4-bit codes with a bfloat16 scale and minimum per group of
    :data:`GROUP_SIZE` inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not can_convert(linear):
            raise ValueError(f"int4-cpu needs an input width that is a multiple of {GROUP_SIZE} and an output "
                             f"width that is a multiple of 16, not {linear.in_features} → {linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scales_and_zeros = quantize_weight(linear.weight.detach())
        if int4_kernel.available():  # the project's kernel: the scales travel inside its blocks
            self.register_buffer("weight_packed", int4_kernel.pack(codes, scales_and_zeros))
            scales_and_zeros = scales_and_zeros[:0]
        else:
            self.register_buffer("weight_packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / GROUP_SIZE, out, 2) bfloat16
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``(out, in)`` float32 (for code that inspects it; forward never builds it)."""
        identity = torch.eye(self.in_features, dtype=COMPUTE_DTYPE)
        return matmul(identity, self.weight_packed, self.scales_and_zeros).float().T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = matmul(x.reshape(-1, self.in_features), self.weight_packed, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"4-bit weight, groups of {GROUP_SIZE}")


def matmul(rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(N, in)`` times a packed 4-bit weight: ``(N, out)`` bfloat16 (float32 for float32 rows on the
    project's kernel). ``packed`` is either
    :mod:`~assistant.engine.int4_kernel`'s blocks (3-d; the scales inside) or PyTorch's layout (2-d)."""
    if packed.dim() == 3:
        return int4_kernel.matmul(rows, packed)
    if rows.dtype != COMPUTE_DTYPE:
        rows = rows.to(COMPUTE_DTYPE)
    return torch._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, GROUP_SIZE, scales_and_zeros)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``(out, in)`` → 4-bit codes ``(out, in)`` int32 and scales-and-zeros ``(in / GROUP_SIZE, out, 2)``
    bfloat16, in the layout the kernel takes. The scale and minimum are rounded to bfloat16 first and the codes
    chosen against the rounded values, so the kernel reconstructs what the codes were chosen for."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
    scale = ((high - low) / LEVELS).clamp(min=torch.finfo(torch.bfloat16).tiny).to(COMPUTE_DTYPE).float()
    low = low.to(COMPUTE_DTYPE).float()
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, LEVELS).to(torch.int32)
    zero = low + ZERO_CODE * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(COMPUTE_DTYPE).contiguous()
    return codes.reshape(out_features, in_features), scales_and_zeros


def quantize_int4_cpu(model: nn.Module) -> int:
    """Replace the decoder's linear layers and ``lm_head`` in ``model`` (in place) with :class:`Int4Linear`;
    how many were converted."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and (".layers." in f".{name}" or name.rpartition(".")[2] == "lm_head")
               and not any(part in name for part in SKIPPED_NAME_PARTS) and can_convert(module)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent: Any = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int4Linear(linear))
    return len(targets)


def is_supported() -> bool:
    """Whether this PyTorch has its CPU kernel (the fallback; the project's own needs it for nothing)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")
