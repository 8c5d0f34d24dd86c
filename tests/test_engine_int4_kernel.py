"""int4-cpu's own kernel (assistant/engine/int4_kernel.cpp): 4-bit weights times int8-quantized bfloat16 rows
with AVX512-VNNI, built on first use. Checked against the same arithmetic written out in torch, against the
exact product, and for rows that do not depend on each other (batched decoding equals unbatched)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from assistant.engine import int4_kernel
from assistant.engine.int4_cpu import GROUP_SIZE, Int4Linear, quantize_weight
from tests.test_engine_int4_cpu import dequantized

pytestmark = pytest.mark.skipif(not int4_kernel.available(),
                                reason="the int4 kernel needs AVX512-VNNI and a compiler (PyTorch's kernel serves)")


def written_out(rows: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: each row's groups of 32 inputs (as bfloat16) rounded to int8 in steps of
    max|x| / 127, times the codes; plus (zero - 8 scale) times the group's sum of inputs."""
    out_features, in_features = codes.shape
    groups = rows.bfloat16().float().reshape(len(rows), -1, GROUP_SIZE)  # float32 rows too
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # float32 division, as the kernel
    # (not 127 / amax: torch computes that as 127 * (1 / amax), another rounding)
    xq, step, groups = torch.round(groups * inverse).double(), (amax / 127).double(), groups.double()
    scale, zero = scales_and_zeros.double().unbind(-1)  # (groups, out)
    q = codes.double().reshape(out_features, -1, GROUP_SIZE)  # (out, groups, 32)
    dots = torch.einsum("rgk,ogk->rgo", xq, q)  # (rows, groups, out)
    return (dots * step * scale + groups.sum(-1, keepdim=True) * (zero - 8 * scale)).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 32), (96, 48), (576, 960), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 70])
def test_the_kernel_computes_what_is_written_out(shape: tuple[int, int], rows: int, dtype: torch.dtype) -> None:
    in_features, out_features = shape
    torch.manual_seed(rows)
    codes, scales_and_zeros = quantize_weight(torch.randn(out_features, in_features) * 0.05)
    x = (torch.randn(rows, in_features) * torch.rand(rows, 1) * 4).to(dtype)
    got = int4_kernel.matmul(x, int4_kernel.pack(codes, scales_and_zeros))
    assert got.shape == (rows, out_features) and got.dtype == dtype  # no casts around the product
    expected = written_out(x, codes, scales_and_zeros)
    # float32 inside a group, one rounding to bfloat16 at the end (float32 outputs hold bfloat16 values)
    torch.testing.assert_close(got.double(), expected, atol=1e-3 * float(expected.abs().max()), rtol=2 ** -7)
    assert torch.equal(got.bfloat16().to(dtype), got)


def test_int8_inputs_stay_close_to_the_exact_product() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 960, bias=False)
    codes, scales_and_zeros = quantize_weight(linear.weight.detach())
    x = torch.randn(8, 576).bfloat16()
    exact = x.float() @ dequantized(linear).T
    got = int4_kernel.matmul(x, int4_kernel.pack(codes, scales_and_zeros)).float()
    assert float((got - exact).abs().max()) < 0.02 * float(exact.abs().max())
    assert float((got - exact).abs().mean()) < 0.015 * float(exact.abs().mean())  # 1.03 % here


def test_a_row_is_the_same_alone_and_in_any_batch() -> None:
    torch.manual_seed(0)
    codes, scales_and_zeros = quantize_weight(torch.randn(48, 96))  # three tiles: the odd one alone
    packed = int4_kernel.pack(codes, scales_and_zeros)
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(70, 96) * torch.rand(70, 1) * 10).to(dtype)
        x[3] = 0  # a row of zeros: no step, no division by it
        together = int4_kernel.matmul(x, packed)
        assert torch.equal(together[3], torch.zeros(48, dtype=dtype))
        for start, stop in [(0, 1), (3, 4), (5, 9), (9, 12), (60, 70), (0, 70)]:
            assert torch.equal(int4_kernel.matmul(x[start:stop].clone(), packed), together[start:stop])


def test_blocks_of_layers_concatenate_along_outputs() -> None:
    """fast_decode fuses q/k/v and gate/up by concatenating the packed blocks."""
    torch.manual_seed(0)
    first, second = Int4Linear(nn.Linear(64, 48, bias=False)), Int4Linear(nn.Linear(64, 16, bias=False))
    assert first.weight_packed.shape == (3, 2, int4_kernel.BLOCK_BYTES)
    fused = torch.cat([first.weight_packed, second.weight_packed])
    x = torch.randn(3, 64)
    assert torch.equal(int4_kernel.matmul(x, fused), torch.cat([first(x), second(x)], dim=-1))


def test_wrong_inputs_are_refused_with_a_reason() -> None:
    codes, scales_and_zeros = quantize_weight(torch.randn(32, 64))
    packed = int4_kernel.pack(codes, scales_and_zeros)
    with pytest.raises(RuntimeError, match="inputs"):
        int4_kernel.matmul(torch.randn(2, 96), packed)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        torch.ops.assistant.int4_mm(torch.randn(2, 64).half(), packed)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.assistant.int4_mm(torch.randn(2, 64).bfloat16(), packed.reshape(2, -1))
    with pytest.raises(ValueError, match="multiples"):
        int4_kernel.pack(torch.zeros(20, 64, dtype=torch.int32), torch.zeros(2, 20, 2, dtype=torch.bfloat16))


def test_switched_off_pytorchs_kernel_serves() -> None:
    script = ("from assistant.engine import int4_kernel; from assistant.engine.int4_cpu import Int4Linear; "
              "import torch; layer = Int4Linear(torch.nn.Linear(64, 64)); "
              "print(int4_kernel.available(), layer.weight_packed.dim())")
    env = {**os.environ, int4_kernel.ENV_SWITCH: "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["False", "2"]


def test_a_build_killed_midway_holds_no_later_load_up() -> None:
    """PyTorch's builder locks with a file; a process killed while building left it, and every later load waited
    for it forever (the server stuck "loading"). A new process loads the kernel all the same."""
    leftover = int4_kernel.cache_dir() / "lock"
    leftover.touch()
    script = "from assistant.engine import int4_kernel; print(int4_kernel.available())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["True"]
    assert not leftover.exists()


def test_its_argmax_is_torchs() -> None:
    """assistant::argmax_rows (what greedy picks use once the kernel is loaded) picks what torch.argmax picks: the
    first of equal largest values, the first NaN, index 0 of a row of -inf; widths off the vector's sixteen."""
    torch.manual_seed(0)
    for width in (1, 15, 16, 17, 100, 49152):
        logits = torch.randn(9, width)
        logits[1] = 1.0  # all tied
        logits[2] = float("-inf")
        logits[3, -1] = float("nan")
        logits[4, width // 2] = float("nan")
        logits[5, 0] = logits[5, -1] = 50.0  # tied at both ends
        logits[6, width // 3] = float("inf")
        expected = logits.argmax(-1)
        assert torch.equal(torch.ops.assistant.argmax_rows(logits), expected), width
        assert torch.equal(int4_kernel.argmax(logits), expected)
        assert int4_kernel.argmax(logits[0]).item() == int(logits[0].argmax())
    other = torch.randn(3, 40).bfloat16()  # another dtype: torch's own
    assert torch.equal(int4_kernel.argmax(other), other.argmax(-1))
    with pytest.raises(RuntimeError, match="2-d float32"):
        torch.ops.assistant.argmax_rows(torch.randn(2, 3).double())
